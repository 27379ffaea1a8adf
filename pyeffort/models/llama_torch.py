"""The Llama / Mistral forward pass in torch (gpt-fast style), twin of the numpy ``Model``: the
same weights, the same RoPE tables (rope.py) and every matrix through pyeffort's effort matmul.

The only device-specific part is the matrix product (``Matmuls``):
- CUDA (``CudaMatmuls``): every matrix a CudaBuckets (pyeffort.cuda; q/k/v and gate/up in one
  ``matmul_group`` call, each matrix at its own effort) and the per-matrix efforts a float64
  device tensor, so that a decode step can be captured once in a CUDA graph (cuda_graph.py) and
  the effort (and the budget split) changed between replays;
- CPU (``HostMatmuls``): torch CPU tensors whose numpy views go through ``pyeffort.matmul`` (the
  numpy model's own EffortLinear objects: its counters, budget split and hooks) — the twin that
  the tests compare with the numpy model on machines without a GPU.

Tensor parallelism (tensor_parallel.py): each rank's TorchModel runs its shard (a narrower
config), ``reduce`` summing each block's attention and feed-forward outputs (wo's and down's
partial sums) over the ranks in place; on CUDA those collectives are captured in the graph.

A Mixtral layer's mixture of experts (``MoE``) routes in torch (the numpy model's rule) and runs
each routed expert's SwiGLU through the same matrix products: on the host the numpy model's
EffortLinears (so its counters count the routed experts only); on CUDA without CUDA graphs, the
routing read back per layer (an expert id read from device memory is not a pyeffort.cuda call).

>>> from pyeffort import models  # doctest: +SKIP
>>> m = models.llama_torch.TorchModel(models.load(), "cuda")  # doctest: +SKIP
>>> list(models.generate.generate(m, m.tokenizer.encode("The sky is"), max_tokens=8))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pyeffort
from pyeffort import _validate, reference
from pyeffort.errors import BackendError
from pyeffort.models.llama import Model

# a layer's matrices in Model.linears() order: wq wk wv wo, then w1 w3 w2 (of each expert)
QKV, WO, GATE_UP, DOWN = (0, 1, 2), (3,), (4, 5), (6,)  # an expert e: GATE_UP, DOWN + 3e
BIASES = ("bq", "bk", "bv")  # optional float32 (n_out,) of wq, wk, wv: layers.{i}.attn.bq ...
CAPACITY = 256  # first KV cache length; doubled when a sequence needs more
GROUP_CT = 64  # column tile of a group whose widths would get different default tiles


def layer_mats(args) -> int:
    """Matrices per layer: 4 of attention and 3 per expert (a dense layer: one "expert")."""
    return 4 + 3 * max(1, args.n_experts)


def layer_groups(args) -> list[tuple[int, ...]]:
    """A layer's calls as indices into it: q/k/v, wo, then gate/up and down of each expert."""
    out = [QKV, WO]
    for e in range(max(1, args.n_experts)):
        out += [(GATE_UP[0] + 3 * e, GATE_UP[1] + 3 * e), (DOWN[0] + 3 * e,)]
    return out


def biases_of(model: Model) -> dict[str, np.ndarray]:
    """``layers.{i}.attn.bq/bk/bv`` as the numpy model holds them (its attention blocks'
    ``bias``: a (bq, bk, bv) tuple, or None)."""
    out = {}
    for i, b in enumerate(model.layers):
        for n, v in zip(BIASES, getattr(b.attn, "bias", None) or (), strict=False):
            out[f"layers.{i}.attn.{n}"] = np.asarray(v, np.float32)
    return out


# ---------------------------------------------------------------- the matrix products


class HostMatmuls:
    """Matrices on the host: ``pyeffort.matmul`` on numpy views of CPU tensors (float32)."""

    def __init__(self, model: Model):
        self.model, self.lins = model, list(model.linears())
        self.effort = 1.0

    def set_effort(self, effort: float) -> None:
        self.effort = effort  # each EffortLinear applies its own budget split

    def group(self, idx: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """x (T, n_in) -> [x @ W_i for i in idx], each (T, n_out_i)."""
        from pyeffort.models.effort_linear import call_group

        xn = x.detach().to(torch.float32).contiguous().numpy()
        ys = call_group([self.lins[i] for i in idx], xn, self.effort)
        return [torch.from_numpy(np.ascontiguousarray(y, np.float32)) for y in ys]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        xn = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
        m = self.model
        y = m.head(xn, self.effort) if m.head is not None else pyeffort.dense_matmul(xn, m.lm_head)
        return torch.from_numpy(y)

    def routed(self, mults: int) -> None:
        """An expert's call of ``mults`` dense multiplications: its EffortLinears count it."""

    def reset_counters(self) -> None:
        self.model.reset_counters()

    def counts(self) -> tuple[int, int]:
        """(multiplications done, those of a dense pass) since reset: the EffortLinears'."""
        return (sum(lin.mults for lin in self.lins), sum(lin.total for lin in self.lins))

    def realised_effort(self) -> float:
        return self.model.realised_effort()


def _on_device(cuda, b, device, ct):
    """A host Buckets repacked for the GPU; a CudaBuckets (built there) as it is."""
    return b if isinstance(b, cuda.CudaBuckets) else cuda.to_device(b, device, ct=ct)


class CudaMatmuls:
    """Matrices on a CUDA device (CudaBuckets; the model's matrices may be CudaBuckets already,
    built on the GPU); ``eff`` (n_mats + 1,) float64 on the device holds each matrix's effort
    (its budget split) and, last, the LM head's. The realised effort's denominator: the tokens
    times the matrices every token goes through, plus each routed expert call (``routed``)."""

    def __init__(self, model: Model, device, dtype):
        from pyeffort import cuda

        self.cuda, self.model, self.lins = cuda, model, list(model.linears())
        if any(lin.hook is not None for lin in self.lins):
            raise BackendError("EffortLinear hooks run on the host path only (device cpu)")
        per, self.mats = layer_mats(model.args), []
        self.groups = {}  # first index -> CudaGroup of q/k/v or gate/up
        for layer in range(model.args.n_layers):
            for grp in layer_groups(model.args):  # in linears() order: mats[i] is lins[i]'s
                idx = [per * layer + i for i in grp]
                g = [reference.n_groups(self.lins[i].shape[1]) for i in idx]
                cts = {cuda.default_ct(gi, device) for gi in g}
                ct = None if len(cts) == 1 else GROUP_CT
                self.mats += [_on_device(cuda, self.lins[i].buckets, device, ct) for i in idx]
                if len(idx) > 1:
                    self.groups[idx[0]] = cuda.CudaGroup([self.mats[i] for i in idx])
        self.head_b = None if model.head is None else cuda.to_device(model.head.buckets, device)
        head = model.lm_head.T  # (vocab, dim) float16, as F.linear takes it
        self.head_w = torch.from_numpy(np.ascontiguousarray(head)).to(device, dtype)
        n = len(self.mats)
        self.eff = torch.ones(n + 1, dtype=torch.float64, device=device)
        self._eff_host = np.ones(n + 1)
        shared = [lin for lin in self.lins if ".experts." not in lin.name]  # every token's
        self.dense = sum(lin.shape[0] * lin.shape[1] for lin in shared)  # mults per token
        self.tokens = 0  # tokens multiplied since reset_counters()
        self.expert_mults = 0  # dense multiplications of the routed experts' calls since then

    def set_effort(self, effort: float) -> None:
        """Each matrix's effort under the model's budget split (no re-capture: a device copy)."""
        e = np.array([lin.own_effort(effort) for lin in self.lins] + [effort], np.float64)
        if not np.array_equal(e, self._eff_host):
            self.eff.copy_(torch.from_numpy(e))
            self._eff_host = e

    def group(self, idx: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
        x, i = x.contiguous(), idx[0]
        e = self.eff[i : i + len(idx)]  # each matrix's effort (a group's indices are consecutive)
        if len(idx) > 1:
            return self.cuda.matmul_group(x, self.groups[i], e, out_dtype=x.dtype)
        return [self.cuda.matmul(x, self.mats[i], e, out_dtype=x.dtype)]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_b is not None:
            return self.cuda.matmul(x.contiguous(), self.head_b, self.eff[-1:])
        return F.linear(x, self.head_w).float()

    def routed(self, mults: int) -> None:
        """An expert's call of ``mults`` dense multiplications (eager: never in a graph)."""
        self.expert_mults += mults

    def info(self) -> list[torch.Tensor]:
        """The kernels' running sums of multiplications done, one (1,) int64 view per matrix."""
        return [b._state[5:6] for b in self.mats]  # pe_cuda_state.info_mults

    def reset_counters(self) -> None:
        for t in self.info():
            t.zero_()
        self.tokens = self.expert_mults = 0

    def counts(self) -> tuple[int, int]:
        """(multiplications done, those of a dense pass) since reset: one device read of every
        matrix's sum (outside any capture)."""
        return int(torch.cat(self.info()).sum()), self.tokens * self.dense + self.expert_mults

    def realised_effort(self) -> float:
        done, total = self.counts()
        return done / total if total else float("nan")


# ---------------------------------------------------------------- the blocks


class RMSNorm(nn.Module):
    def __init__(self, weight: np.ndarray, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.tensor(np.asarray(weight, np.float32)))  # (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd) "rotate half" by cos, sin (T, 1, hd/2) float32 -> x's dtype."""
    h = x.shape[-1] // 2
    a, b = x[..., :h].float(), x[..., h:].float()
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).to(x.dtype)


class Attention(nn.Module):
    """GQA over a static KV cache k, v (n_kv, capacity, hd): a query sees the cache positions
    its mask allows (causal, and the sliding window)."""

    def __init__(self, args, layer: int, mm, biases: dict, capacity: int, dtype, device):
        super().__init__()
        self.mm, self.i0 = mm, layer_mats(args) * layer
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = 1.0 / float(np.sqrt(self.hd))
        for n in BIASES:
            b = biases.get(f"layers.{layer}.attn.{n}")
            self.register_buffer(n, None if b is None else torch.tensor(b).to(device, dtype))
        shape = (self.n_kv, capacity, self.hd)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, x, pos, cos, sin, mask) -> torch.Tensor:
        """x (T, dim) at positions pos (T,) -> (T, dim); mask (T, capacity) bool."""
        t, hd, n_kv = x.shape[0], self.hd, self.n_kv
        rep = self.n_heads // n_kv
        q, k, v = self.mm.group(tuple(self.i0 + i for i in QKV), x)
        if self.bq is not None:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        q = apply_rope(q.view(t, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(t, n_kv, hd), cos, sin)
        self.k_cache.index_copy_(1, pos, k.transpose(0, 1))
        self.v_cache.index_copy_(1, pos, v.view(t, n_kv, hd).transpose(0, 1))
        q = q.view(t, n_kv, rep, hd).permute(1, 2, 0, 3).reshape(n_kv, rep * t, hd)
        s = torch.bmm(q, self.k_cache.transpose(1, 2)).float() * self.scale  # (n_kv, rep*T, C)
        s = s.view(n_kv, rep, t, -1).masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1).to(x.dtype).view(n_kv, rep * t, -1)
        o = torch.bmm(p, self.v_cache).view(n_kv, rep, t, hd).permute(2, 0, 1, 3)
        return self.mm.group((self.i0 + WO[0],), o.reshape(t, self.n_heads * hd))[0]


class FeedForward(nn.Module):
    """SwiGLU whose gate, up, down are the matrices i0, i0 + 1, i0 + 2."""

    def __init__(self, i0: int, mm):
        super().__init__()
        self.mm, self.i0 = mm, i0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.mm.group((self.i0, self.i0 + 1), x)
        return self.mm.group((self.i0 + 2,), F.silu(g) * u)[0]


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route in torch: logits (T, n_experts) -> experts (T, k) int64, most probable first
    (ties: the lower expert), and weights (T, k) float32 (softmax, top k, renormalised)."""
    p = torch.softmax(logits.float(), -1)
    top, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    top, idx = top[:, :k], idx[:, :k]
    return idx, top / top.sum(-1, keepdim=True)


class MoE(nn.Module):
    """Mixtral's sparse block (pyeffort.models.moe): a dense float32 router, then each routed
    expert once, on its tokens. The routing is read back to the host per layer (which experts
    run is data-dependent), so a mixture of experts decodes eagerly, never in a CUDA graph, and
    an expert no token is routed to reads no byte and counts nothing."""

    def __init__(self, args, i0: int, router: np.ndarray, mm):
        super().__init__()
        self.mm, self.k = mm, args.n_experts_per_tok
        self.register_buffer("router", torch.from_numpy(np.array(router, np.float32)))  # (dim, E)
        self.experts = nn.ModuleList(FeedForward(i0 + 3 * e, mm) for e in range(args.n_experts))
        self.mults = 3 * args.dim * args.hidden_dim  # dense multiplications of an expert, a token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, wts = route(x.float() @ self.router, self.k)  # (T, k) each
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(idx).tolist():  # the host read: each routed expert, in order
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            self.mm.routed(rows.numel() * self.mults)
            y = self.experts[e](x.index_select(0, rows)).float()
            out.index_add_(0, rows, wts[rows, slot, None] * y)
        return out.to(x.dtype)


def _whole(y: torch.Tensor) -> torch.Tensor:
    return y  # one process: a block's output is already the whole sum


class TransformerBlock(nn.Module):
    """``reduce(y) -> y``: the attention's and the feed-forward's outputs (wo's, down's)
    summed over the tensor-parallel ranks, in place (tensor_parallel.Comm.reduce)."""

    def __init__(self, args, layer: int, model: Model, mm, biases, capacity, dtype, device,
                 reduce=_whole):  # fmt: skip
        super().__init__()
        self.reduce = reduce
        blk = model.layers[layer]
        self.attn_norm = RMSNorm(blk.attn_norm.weight, args.norm_eps)
        self.ffn_norm = RMSNorm(blk.ffn_norm.weight, args.norm_eps)
        self.attn = Attention(args, layer, mm, biases, capacity, dtype, device)
        i0 = layer_mats(args) * layer + 4  # the first gate
        if args.n_experts:
            self.ffn = MoE(args, i0, blk.ffn.router, mm)
        else:
            self.ffn = FeedForward(i0, mm)

    def forward(self, h, pos, cos, sin, mask) -> torch.Tensor:
        h = h + self.reduce(self.attn(self.attn_norm(h), pos, cos, sin, mask))
        return h + self.reduce(self.ffn(self.ffn_norm(h)))


class Transformer(nn.Module):
    """``forward(tokens (T,), pos (T,), last_only) -> logits (T or 1, vocab)`` float32, tensors
    on the model's device: no host value is read, so a step can be captured in a CUDA graph.
    ``reduce``: a tensor-parallel rank's sum over the ranks (TransformerBlock)."""

    def __init__(self, model: Model, mm, *, biases=None, capacity=CAPACITY, dtype, device,
                 reduce=_whole):  # fmt: skip
        super().__init__()
        args = self.args = model.args
        self.mm, self.dtype, self.device = mm, dtype, torch.device(device)
        self.rope = model.layers[0].attn.rope  # the numpy model's tables (rope.py)
        self.window = args.sliding_window
        biases = biases_of(model) if biases is None else biases
        self.register_buffer("embed", torch.tensor(np.asarray(model.embed), device=device))
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, model, mm, biases, capacity, dtype, device, reduce)
            for i in range(args.n_layers)
        )
        self.norm = RMSNorm(model.norm.weight, args.norm_eps)
        self.to(device)
        self._tables(capacity)

    @property
    def capacity(self) -> int:
        return self.pos_ids.shape[0]

    def _tables(self, capacity: int) -> None:
        self.rope.at(capacity - 1)  # grows the numpy tables to cover the cache
        dev = self.device
        self.cos = torch.from_numpy(self.rope.cos[:capacity]).to(dev)  # (C, hd/2) float32
        self.sin = torch.from_numpy(self.rope.sin[:capacity]).to(dev)
        self.pos_ids = torch.arange(capacity, device=dev)  # (C,)

    def grow(self, need: int) -> None:
        """A KV cache of at least ``need`` positions (doubling; the filled part is kept)."""
        if need <= self.capacity:
            return
        cap = min(max(need, 2 * self.capacity), self.args.max_seq_len)
        for b in self.layers:
            for name in ("k_cache", "v_cache"):
                old = getattr(b.attn, name)
                new = old.new_zeros((old.shape[0], cap, old.shape[2]))
                new[:, : old.shape[1]] = old
                setattr(b.attn, name, new)
        self._tables(cap)

    def forward(self, tokens, pos, last_only: bool = False) -> torch.Tensor:
        h = self.embed.index_select(0, tokens).to(self.dtype)  # (T, dim)
        cos = self.cos.index_select(0, pos)[:, None, :]  # (T, 1, hd/2)
        sin = self.sin.index_select(0, pos)[:, None, :]
        d = pos[:, None] - self.pos_ids[None, :]  # (T, C): query position - key position
        mask = d >= 0
        if self.window:
            mask &= d < self.window
        for b in self.layers:
            h = b(h, pos, cos, sin, mask)
        if last_only:
            h = h[-1:]
        return self.mm.head(self.norm(h))


# ---------------------------------------------------------------- generate()'s model


class TorchModel:
    """The numpy ``Model``'s interface for ``generate()`` (forward -> numpy logits, the cache,
    the counters) over a ``Transformer`` on ``device``. On CUDA each decoded token (T = 1) is one
    CUDA graph replay unless ``graphs=False`` or the model is a mixture of experts (its routing
    is read back per layer: eager decode); the prefill runs eagerly.

    ``dtype``: activations and KV cache (float32 by default: the numpy model's precision);
    ``biases``: q/k/v biases by name (default: those the numpy model holds, ``biases_of``);
    ``matmuls``: the matrix products (default: CudaMatmuls or HostMatmuls, by device);
    ``reduce``: a tensor-parallel rank's sum of wo's and down's outputs over the ranks
    (tensor_parallel.Comm.reduce; default: one process)."""

    def __init__(self, model: Model, device="cuda", *, dtype=torch.float32, graphs=True,
                 biases=None, capacity=CAPACITY, matmuls=None, reduce=_whole):  # fmt: skip
        if str(device).split(":")[0] not in ("cpu", "cuda"):
            raise BackendError(f"the torch model runs on cpu or cuda, not {device}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("device cuda: torch sees no CUDA GPU")
        if self.device.type == "cpu" and dtype != torch.float32:
            raise BackendError("the host matrices take float32 activations")
        self.model, self.args, self.tokenizer = model, model.args, model.tokenizer
        on_gpu = self.device.type == "cuda"
        if matmuls is None:
            matmuls = CudaMatmuls(model, self.device, dtype) if on_gpu else HostMatmuls(model)
        self.mm = matmuls
        capacity = min(capacity, self.args.max_seq_len)
        self.net = Transformer(model, self.mm, biases=biases, capacity=capacity, dtype=dtype,
                               device=self.device, reduce=reduce)  # fmt: skip
        self.graph = None
        if on_gpu and graphs and not self.args.n_experts:
            from pyeffort.models.cuda_graph import GraphDecoder

            self.graph = GraphDecoder(self.net)
        self.length = 0  # positions in the cache

    def linears(self):
        return self.model.linears()

    def reset(self) -> None:
        self.length = 0

    def reset_counters(self) -> None:
        self.mm.reset_counters()

    def realised_effort(self) -> float:
        return self.mm.realised_effort()

    def forward(self, tokens, start_pos: int = 0, effort: float = 1.0, *, last_only=False):
        """tokens (T,) ints -> logits (T, vocab) float32 numpy (``last_only``: (1, vocab))."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self._check(tokens, start_pos)
        effort = _validate.effort(effort)
        end = start_pos + tokens.size
        self.net.grow(end)
        self.mm.set_effort(effort)
        if tokens.size == 1 and self.graph is not None:
            logits = self.graph(int(tokens[0]), start_pos)
        else:
            dev = self.device
            pos = torch.arange(start_pos, end, device=dev)
            with torch.no_grad():
                logits = self.net(torch.from_numpy(tokens).to(dev), pos, last_only)
        if hasattr(self.mm, "tokens"):  # counted on the device: the host counts tokens
            self.mm.tokens += tokens.size
        self.length = end
        out = logits.float().cpu().numpy()
        return out[-1:] if last_only else out

    __call__ = forward

    def _check(self, tokens: np.ndarray, start_pos: int) -> None:
        if tokens.size == 0:
            raise ValueError("forward needs at least one token")
        vocab = self.args.vocab_size
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"token ids must lie in 0..{vocab - 1}")
        if not 0 <= start_pos <= self.length:
            raise ValueError(f"start_pos {start_pos} outside 0..{self.length} (cache)")
        if start_pos + tokens.size > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + tokens.size - 1} lie past the model's "
                             f"context of {self.args.max_seq_len} (max_seq_len)")  # fmt: skip
