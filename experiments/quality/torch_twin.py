"""A torch twin of the harness's default rule, for calibrating budget splits fast on a GPU.

The model is the harness's Llama (GGUF weights dequantised to float16, float32 products, the
interleaved GGUF rotary layout, tied LM head) over a batch of windows; every linear runs
``twin(x, effort)``: the default rule's selection (RMS bucket-row statistic, plain or weighted by
per-output weights as ``build_buckets(W, out_weight=a)`` makes it; exact cutoff on
``abs(x_i) * stat(k, i)``, each input keeping a prefix of its ranks) with the products of the kept
weights, as ``rules.bucket_twin`` does in numpy. Used only to search for a profile; the tables in
``experiments/README.md`` come from the numpy harness and ``pyeffort.matmul``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pyeffort.models.loaders.gguf import NAMES

GROUP = 16


class TwinMatrix:
    """W (n_in, n_out) float16 on a device: float32 copy, split by rank, RMS row statistic.

    ``out_weight`` (n_out,) float32 or None: ranks and statistics follow ``fp16(a_j * w_ij)``, as
    ``reference.build(w16, out_weight)`` (``stat=rms_out_weighted``); the products use W."""

    def __init__(self, name: str, w16: np.ndarray, device, out_weight: np.ndarray | None = None):
        self.name = name
        n_in, n_out = w16.shape
        if n_out % GROUP:
            raise ValueError(f"{name}: n_out {n_out} is not a multiple of {GROUP}")
        self.n_in, self.n_out, self.size = n_in, n_out, n_in * n_out
        w = torch.from_numpy(np.ascontiguousarray(w16)).to(device)
        ranked = w
        if out_weight is not None:
            a = np.asarray(out_weight, dtype=np.float32)
            if a.shape != (n_out,):
                raise ValueError(f"{name}: out_weight shape {a.shape}, expected ({n_out},)")
            ranked = (w.float() * torch.from_numpy(a).to(device)[None, :]).half()
        key = (ranked.view(torch.int16).to(torch.int32) & 0x7FFF).reshape(n_in, -1, GROUP)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(GROUP, device=device).expand_as(order).contiguous())
        rank = rank.reshape(n_in, n_out)
        self.w32 = w.float()
        self.rank = rank.to(torch.uint8)
        g = n_out // GROUP
        sq = torch.zeros(GROUP, n_in, dtype=torch.float64, device=device)
        sq.scatter_add_(0, rank.T.contiguous(), (ranked.double() ** 2).T.contiguous())
        self.stats = (sq / g).sqrt().float()  # (16, n_in)
        self.mults_per_row = g
        self._stack = None

    @property
    def stack(self) -> torch.Tensor:
        """(16, n_in, n_out) float32: W split by rank (made on first use)."""
        if self._stack is None:
            r = self.rank.long()
            self._stack = torch.stack([torch.where(r == k, self.w32, 0.0) for k in range(GROUP)])
        return self._stack

    def keep(self, x: torch.Tensor, effort: float) -> torch.Tensor:
        """(N, n_in) ranks kept per input at ``effort`` (the exact cutoff)."""
        n = x.shape[0]
        rows = min(math.ceil(effort * self.size / self.mults_per_row - 1e-9), GROUP * self.n_in)
        if rows <= 0:
            return torch.zeros(n, self.n_in, dtype=torch.int64, device=x.device)
        s = (x.abs()[:, None, :] * self.stats[None]).reshape(n, -1)
        c = torch.topk(s, rows, dim=1, sorted=False).values.min(1).values
        return (s.reshape(n, GROUP, self.n_in) >= c[:, None, None]).sum(1)

    def __call__(self, x: torch.Tensor, effort: float):
        """x (N, n_in) -> (y (N, n_out), multiplications done: a 0-d tensor or an int)."""
        if effort >= 1.0:
            return x @ self.w32, x.shape[0] * self.size
        k = self.keep(x, effort)
        return self.product(x, k), k.sum() * self.mults_per_row

    def product(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """sum over inputs i of x_i times the weights of row i with rank < k[:, i]."""
        r = torch.arange(GROUP, device=x.device)[None, :, None]
        return self.product_rows(x, k[:, None, :] > r)

    def product_rows(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """sum over the bucket rows (k, i) with keep[:, k, i] (N, 16, n_in) of x_i times them."""
        xs = torch.where(keep.transpose(0, 1), x[None], 0.0)  # (16, N, n_in)
        return torch.bmm(xs, self.stack).sum(0)


TYPES = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w3", "ffn.w2")
GGUF = NAMES  # GGUF tensor kinds -> our matrix and vector names


class TwinLlama:
    """``forward(tokens (B, T), hook) -> logits (B, T, vocab)``; ``hook(name, matrix, x)``.

    ``out_weights``: {matrix name: (n_out,) float32} in ``pyeffort.models``' row order (q/k
    de-interleaved, as the shipped file keeps them) for the output-weighted statistic, or None."""

    def __init__(self, gguf_path: str, device="cuda", out_weights: dict | None = None):
        import gguf

        r = gguf.GGUFReader(gguf_path)

        def field(k):
            return r.fields[k].contents()

        self.dim = int(field("llama.embedding_length"))
        self.n_layers = int(field("llama.block_count"))
        self.n_heads = int(field("llama.attention.head_count"))
        self.n_kv = int(field("llama.attention.head_count_kv"))
        self.eps = float(field("llama.attention.layer_norm_rms_epsilon"))
        self.theta = float(field("llama.rope.freq_base"))
        self.device = device
        self.mats: dict[str, TwinMatrix] = {}
        self.vecs: dict[str, torch.Tensor] = {}
        for t in r.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)  # (n_out, n_in)
            if t.name == "token_embd.weight":
                self.embed = torch.from_numpy(arr.astype(np.float32)).to(device)
            elif t.name == "output_norm.weight":
                self.norm = torch.from_numpy(arr.astype(np.float32)).to(device)
            elif t.name.startswith("blk."):
                _, i, kind, _ = t.name.split(".")
                name = f"layers.{i}.{GGUF[kind]}"
                if arr.ndim == 1:
                    self.vecs[name] = torch.from_numpy(arr.astype(np.float32)).to(device)
                else:
                    a = self._gguf_order(name, (out_weights or {}).get(name))
                    self.mats[name] = TwinMatrix(name, arr.T.astype(np.float16), device, a)
        self.names = [f"layers.{i}.{t}" for i in range(self.n_layers) for t in TYPES]

    def _gguf_order(self, name: str, a: np.ndarray | None) -> np.ndarray | None:
        """The twin keeps GGUF's interleaved q/k rows: ``a`` permuted the inverse way of the
        loader's ``unpermute`` ((head, 2, hd/2) -> (head, hd/2, 2))."""
        if a is None or not name.endswith(("attn.wq", "attn.wk")):
            return a
        heads = self.n_heads if name.endswith("wq") else self.n_kv
        return np.asarray(a).reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)

    def _rms(self, x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * w

    def _rope(self, x):
        """x (B, T, heads, hd), interleaved pairs, positions 0..T-1."""
        t, hd = x.shape[1], x.shape[-1]
        freq = self.theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float64) / hd)
        ang = torch.arange(t, device=x.device, dtype=torch.float64)[:, None] * freq[None]
        c, s = torch.cos(ang).float()[:, None, :], torch.sin(ang).float()[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, hook) -> torch.Tensor:
        b_n, t_n = tokens.shape
        hd = self.dim // self.n_heads
        rep = self.n_heads // self.n_kv
        mask = torch.triu(torch.full((t_n, t_n), float("-inf"), device=self.device), 1)

        def lin(name, x):
            y = hook(name, self.mats[name], x.reshape(b_n * t_n, -1))
            return y.reshape(b_n, t_n, -1)

        h = self.embed[tokens]
        for i in range(self.n_layers):
            p = f"layers.{i}."
            x = self._rms(h, self.vecs[p + "attn_norm"])
            q = self._rope(lin(p + "attn.wq", x).reshape(b_n, t_n, self.n_heads, hd))
            k = self._rope(lin(p + "attn.wk", x).reshape(b_n, t_n, self.n_kv, hd))
            v = lin(p + "attn.wv", x).reshape(b_n, t_n, self.n_kv, hd)
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
            s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + mask
            o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v).reshape(b_n, t_n, -1)
            h = h + lin(p + "attn.wo", o)
            x = self._rms(h, self.vecs[p + "ffn_norm"])
            g = lin(p + "ffn.w1", x)
            u = lin(p + "ffn.w3", x)
            h = h + lin(p + "ffn.w2", torch.nn.functional.silu(g) * u)
        return self._rms(h, self.norm) @ self.embed.T


def exact_hook(name, m: TwinMatrix, x):
    return x @ m.w32


def kl_per_token(p_log: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(exact || approx) per position; ``p_log`` the exact log-probabilities (float64)."""
    q = torch.log_softmax(logits.double(), -1)
    return (p_log.exp() * (p_log - q)).sum(-1)
