"""The Llama / Mistral / Qwen2 transformer in numpy: RMSNorm, RoPE (with its scalings, see
pyeffort.models.rope), grouped-query attention with a KV cache (Mistral's sliding window, Qwen2's
q/k/v biases), SwiGLU, tied or separate LM head. Every matrix of every layer is an
EffortLinear; the LM head is a dense float16 product (``pyeffort.dense_matmul``).

Weights come as a mapping of our names to arrays (norms, embedding, LM head) or Buckets (matrices):
``embed`` (vocab, dim), ``norm`` (dim,), ``lm_head`` (dim, vocab) unless tied, and per layer
``layers.{i}.attn_norm``, ``layers.{i}.ffn_norm`` (dim,), ``layers.{i}.attn.{wq,wk,wv,wo}``,
``layers.{i}.ffn.{w1,w3,w2}`` with W (n_in, n_out) so that y = x @ W, and when
``args.qkv_bias`` ``layers.{i}.attn.{bq,bk,bv}`` (n_out,) float32 added to q, k, v. A Mixtral
layer (``args.n_experts``) has a mixture of experts in place of the feed-forward
(pyeffort.models.moe).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

import pyeffort
from pyeffort import _backend
from pyeffort.models.args import ModelArgs
from pyeffort.models.cache import KVCache
from pyeffort.models.effort_linear import EffortLinear, call_group, prefetch_group
from pyeffort.models.moe import MoE
from pyeffort.models.rope import Rope


def ops():
    """The backend's decoding steps (rmsnorm, silu_mul, rope, attend): the compiled core, or
    the numpy reference under ``PYEFFORT_BACKEND=numpy``."""
    return _backend.current


ATTN = ("wq", "wk", "wv", "wo")
FFN = ("w1", "w3", "w2")  # gate, up, down
BIAS = ("bq", "bk", "bv")  # of wq, wk, wv (args.qkv_bias)
DENSE_PREFILL_MAX_BYTES = 4 * 2**30


def _row(a: np.ndarray) -> np.ndarray:
    """The first row of a (1, n) result as a contiguous float32 (n,) (a hook's output too)."""
    return np.ascontiguousarray(a[0], np.float32)


class RMSNorm:
    def __init__(self, weight: np.ndarray, eps: float):
        self.weight = np.asarray(weight, dtype=np.float32)  # (dim,)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (T, dim) -> (T, dim) float32."""
        if x.shape[0] == 1:  # decoding: one call into the backend
            out = np.empty(x.shape, np.float32)
            ops().rmsnorm(_row(x), self.weight, self.eps, out[0])
            return out
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(ms + self.eps)) * self.weight


class Attention:
    def __init__(self, args: ModelArgs, layer: int, w: Mapping, rope: Rope):
        p = f"layers.{layer}.attn."
        self.wq, self.wk, self.wv, self.wo = (EffortLinear(p + n, w[p + n]) for n in ATTN)
        self.bias = None  # (bq, bk, bv) float32 or None
        if args.qkv_bias:
            self.bias = tuple(np.asarray(w[p + n], dtype=np.float32) for n in BIAS)
        self.layer, self.rope = layer, rope
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.scale = np.float32(1.0 / np.sqrt(self.hd))

    def __call__(self, x: np.ndarray, start: int, effort: float, cache: KVCache) -> np.ndarray:
        """x (T, dim) at positions start.. -> (T, dim)."""
        t, hd, n_kv = x.shape[0], self.hd, self.n_kv
        rep = self.n_heads // n_kv
        q, k, v = call_group([self.wq, self.wk, self.wv], x, effort)
        if self.bias is not None:
            q, k, v = (y + b for y, b in zip((q, k, v), self.bias, strict=True))
        if t == 1:  # decoding: wo's copy comes in while the attention runs
            self.wo.prefetch()
            return self.wo(self._attend_one(q, k, v, start, cache), effort)
        q = self.rope(q.reshape(t, self.n_heads, hd), start)
        k = self.rope(k.reshape(t, n_kv, hd), start)
        v = v.reshape(t, n_kv, hd)
        keys, vals = cache.update(self.layer, start, k, v)  # (n_kv, S, hd)
        lo = max(0, start - self.window + 1) if self.window else 0
        keys, vals = keys[:, lo:], vals[:, lo:]
        q = q.reshape(t, n_kv, rep, hd).transpose(1, 2, 0, 3).reshape(n_kv, rep * t, hd)
        s = (q @ keys.transpose(0, 2, 1)) * self.scale  # (n_kv, rep*T, S)
        if t > 1 or self.window:
            s = s.reshape(n_kv, rep, t, -1) + self._mask(start, t, lo, keys.shape[1])
            s = s.reshape(n_kv, rep * t, -1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ vals).reshape(n_kv, rep, t, hd).transpose(2, 0, 1, 3).reshape(t, -1)
        return self.wo(np.ascontiguousarray(o), effort)

    def _attend_one(self, q, k, v, start: int, cache: KVCache) -> np.ndarray:
        """One decoding step's rope, cache write and attention, each one backend call:
        q (1, n_heads * hd), k, v (1, n_kv * hd) at position start -> (1, n_heads * hd)."""
        be, hd = ops(), self.hd
        q = np.ascontiguousarray(q, np.float32).reshape(self.n_heads, hd)  # a hook's output too
        k = np.ascontiguousarray(k, np.float32).reshape(self.n_kv, hd)
        cos, sin = self.rope.at(start)
        be.rope(q, cos, sin)
        be.rope(k, cos, sin)
        cache.put(self.layer, start, k, v.reshape(self.n_kv, hd))
        lo = max(0, start - self.window + 1) if self.window else 0
        out = np.empty((1, self.n_heads * hd), np.float32)
        be.attend(
            q,
            cache.k[self.layer],
            cache.v[self.layer],
            lo,
            start + 1,
            self.scale,
            out.reshape(self.n_heads, hd),
        )
        return out

    def _mask(self, start: int, t: int, lo: int, n_keys: int) -> np.ndarray:
        """(T, S) additive mask: query start+i sees key lo+j iff 0 <= (start+i)-(lo+j) < window."""
        d = (start + np.arange(t))[:, None] - (lo + np.arange(n_keys))[None, :]
        ok = d >= 0
        if self.window:
            ok &= d < self.window
        return np.where(ok, 0.0, -np.inf).astype(np.float32)


class FeedForward:
    def __init__(self, layer: int, w: Mapping, prefix: str | None = None):
        p = prefix or f"layers.{layer}.ffn."  # a MoE's expert: layers.{layer}.ffn.experts.{e}.
        self.w1, self.w3, self.w2 = (EffortLinear(p + n, w[p + n]) for n in FFN)

    def linears(self) -> list[EffortLinear]:
        return [self.w1, self.w3, self.w2]

    def __call__(self, x: np.ndarray, effort: float) -> np.ndarray:
        g, u = call_group([self.w1, self.w3], x, effort)
        if x.shape[0] == 1:  # decoding: one call into the backend
            a = np.empty(g.shape, np.float32)
            ops().silu_mul(_row(g), _row(u), a[0])
            return self.w2(a, effort)
        return self.w2(g / (1.0 + np.exp(-g)) * u, effort)


class TransformerBlock:
    def __init__(self, args: ModelArgs, layer: int, w: Mapping, rope: Rope):
        p = f"layers.{layer}."
        self.attn_norm = RMSNorm(w[p + "attn_norm"], args.norm_eps)
        self.ffn_norm = RMSNorm(w[p + "ffn_norm"], args.norm_eps)
        self.attn = Attention(args, layer, w, rope)
        self.ffn = MoE(args, layer, w, FeedForward) if args.n_experts else FeedForward(layer, w)

    def __call__(self, h: np.ndarray, start: int, effort: float, cache: KVCache) -> np.ndarray:
        h = h + self.attn(self.attn_norm(h), start, effort, cache)
        return h + self.ffn(self.ffn_norm(h), effort)


class Model:
    """``forward(tokens (T,), start_pos, effort) -> logits (T, vocab)`` float32, with a KV cache.

    A call with ``start_pos=0`` starts a new sequence (``reset()`` does it too); a call with
    ``start_pos=n`` continues after the first n positions already in the cache.
    """

    def __init__(self, args: ModelArgs, w: Mapping, tokenizer=None):
        self.args, self.tokenizer = args, tokenizer
        self.embed = np.asarray(w["embed"])  # (vocab, dim) float16 or float32
        rope = Rope(args)
        self.layers = [TransformerBlock(args, i, w, rope) for i in range(args.n_layers)]
        self.norm = RMSNorm(w["norm"], args.norm_eps)
        head = self.embed.T if args.tie_embeddings else w["lm_head"]
        self.lm_head = np.ascontiguousarray(head, dtype=np.float16)  # (dim, vocab)
        self.head: EffortLinear | None = None  # set by effort_head(True): the LM head at effort
        self.cache = KVCache(args.n_layers, args.n_kv_heads, args.head_dim)
        self.profile: dict | None = None  # the budget profile in use (set_profile)
        # a dense float16 copy for fast prefill costs 0.8x the buckets' memory: only when small
        small = sum(lin.buckets.nbytes for lin in self.linears()) < DENSE_PREFILL_MAX_BYTES
        for lin in self.linears():
            lin.prefill_dense = small

    def linears(self) -> Iterator[EffortLinear]:
        """Every effort matrix, layer by layer: wq wk wv wo w1 w3 w2 (of each expert, in a
        mixture of experts)."""
        for b in self.layers:
            yield b.attn.wq
            yield b.attn.wk
            yield b.attn.wv
            yield b.attn.wo
            yield from b.ffn.linears()

    def reset(self) -> None:
        self.cache.reset()

    def set_profile(self, profile: dict | None) -> None:
        """Split each asked effort between the matrices by a budget profile
        (``pyeffort.models.profiles.allocation``); the multiplications of all matrices together stay the
        asked fraction. None: every matrix at the asked effort."""
        from pyeffort.models.profiles.allocation import Allocation

        lins = list(self.linears())
        self.profile = profile
        alloc = None
        if profile is not None:
            alloc = Allocation([lin.name for lin in lins], [lin.shape[0] * lin.shape[1]
                               for lin in lins], profile)  # fmt: skip
        for lin in lins:
            lin.split = None if alloc is None else (lambda e, n=lin.name: alloc.efforts(e)[n])

    def effort_head(self, on: bool = True) -> None:
        """Run the LM head through ``pyeffort.matmul`` at the requested effort too (it is dense
        by default); its buckets are built here, with the value kind of the model's matrices.
        It is not among ``linears()``."""
        self.head = None
        if on:
            kind = next(iter(self.linears())).buckets.values_kind
            self.head = EffortLinear("lm_head", pyeffort.build_buckets(self.lm_head, values=kind))

    def forward(self, tokens, start_pos: int = 0, effort: float = 1.0, *, last_only=False):
        """tokens (T,) ints -> logits (T, vocab) float32 (``last_only``: (1, vocab))."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.embed.shape[0]:
            raise ValueError(f"token ids must lie in 0..{self.embed.shape[0] - 1}")
        if not 0 <= start_pos <= self.cache.length:
            raise ValueError(f"start_pos {start_pos} outside 0..{self.cache.length} (cache)")
        if start_pos + tokens.size > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + tokens.size - 1} lie past the model's "
                             f"context of {self.args.max_seq_len} (max_seq_len)")  # fmt: skip
        h = self.embed[tokens].astype(np.float32)  # (T, dim)
        for i, b in enumerate(self.layers):
            h = b(h, start_pos, effort, self.cache)
            if h.shape[0] == 1 and i + 1 < len(self.layers):  # decoding: the next layer's qkv
                nxt = self.layers[i + 1].attn
                prefetch_group([nxt.wq, nxt.wk, nxt.wv])
        if last_only:
            h = h[-1:]
        x = np.ascontiguousarray(self.norm(h), dtype=np.float32)
        if self.head is not None:
            return self.head(x, effort)
        return pyeffort.dense_matmul(x, self.lm_head)

    __call__ = forward

    def realised_effort(self) -> float:
        """Multiplications done / a dense pass would do, over all effort matrices, since reset."""
        done = sum(lin.mults for lin in self.linears())
        total = sum(lin.total for lin in self.linears())
        return done / total if total else float("nan")

    def reset_counters(self) -> None:
        for lin in self.linears():
            lin.reset_counters()

    @property
    def nbytes(self) -> int:
        mats = sum(lin.buckets.nbytes for lin in self.linears())
        return mats + self.embed.nbytes + (0 if self.args.tie_embeddings else self.lm_head.nbytes)
