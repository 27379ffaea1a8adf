"""A small numpy Llama for the quality harness: tiny random configs for tests, and a GGUF loader
used only when the package's own model (``pyeffort.models``) is not available.

It follows the agreed model interface: every linear is an ``EffortLinear`` with ``name``,
``buckets`` (built lazily), ``hook`` and ``__call__(x, effort)``; ``Model.linears()`` yields them;
``Model.forward(tokens, start_pos, effort) -> logits (T, vocab)`` (a whole window, no KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ModelArgs:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 128
    vocab_size: int = 96
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class EffortLinear:
    """y = x @ W with W (n_in, n_out) float16; ``effort`` < 1 runs pyeffort.matmul."""

    def __init__(self, name: str, w16: np.ndarray):
        self.name = name
        self.w16 = np.ascontiguousarray(w16, dtype=np.float16)  # (n_in, n_out)
        self._buckets = None
        self.hook = None

    @property
    def buckets(self):
        if self._buckets is None:
            from pyeffort import build_buckets

            self._buckets = build_buckets(self.w16)
        return self._buckets

    def __call__(self, x: np.ndarray, effort: float) -> np.ndarray:
        if self.hook is not None:
            return self.hook(self, x, effort)
        import pyeffort

        x = np.ascontiguousarray(x, dtype=np.float32)
        if effort >= 1.0:
            return pyeffort.dense_matmul(x, self.w16)
        return pyeffort.matmul(x, self.buckets, effort)


def _rms(x, w, eps):
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) * w


def _rope(x, pos, theta):
    """x (T, heads, hd) with interleaved pairs (GGUF layout) rotated by position."""
    hd = x.shape[-1]
    freq = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * freq[None, :]  # (T, hd/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


class Model:
    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray]):
        self.args = args
        self.embed = weights["embed"].astype(np.float32)  # (vocab, dim)
        self.norm = weights["norm"].astype(np.float32)
        self.layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            lin = {
                k: EffortLinear(p + n, weights[p + n])
                for k, n in [
                    ("wq", "attn.wq"),
                    ("wk", "attn.wk"),
                    ("wv", "attn.wv"),
                    ("wo", "attn.wo"),
                    ("w1", "ffn.w1"),
                    ("w3", "ffn.w3"),
                    ("w2", "ffn.w2"),
                ]
            }
            lin["attn_norm"] = weights[p + "attn_norm"].astype(np.float32)
            lin["ffn_norm"] = weights[p + "ffn_norm"].astype(np.float32)
            self.layers.append(lin)
        self.lm_head = self.embed.T.astype(np.float32)  # tied, dense

    def linears(self):
        for layer in self.layers:
            for k in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
                yield layer[k]

    def forward(self, tokens, start_pos: int = 0, effort: float = 1.0) -> np.ndarray:
        a = self.args
        tokens = np.asarray(tokens)
        t_n, hd = len(tokens), a.dim // a.n_heads
        pos = np.arange(start_pos, start_pos + t_n, dtype=np.float64)
        mask = np.triu(np.full((t_n, t_n), -np.inf, np.float32), 1)
        h = self.embed[tokens]
        for L in self.layers:
            x = _rms(h, L["attn_norm"], a.norm_eps).astype(np.float32)
            q = _rope(L["wq"](x, effort).reshape(t_n, a.n_heads, hd), pos, a.rope_theta)
            k = _rope(L["wk"](x, effort).reshape(t_n, a.n_kv_heads, hd), pos, a.rope_theta)
            v = L["wv"](x, effort).reshape(t_n, a.n_kv_heads, hd)
            rep = a.n_heads // a.n_kv_heads
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(t_n, a.dim).astype(np.float32)
            h = h + L["wo"](o, effort)
            x = _rms(h, L["ffn_norm"], a.norm_eps).astype(np.float32)
            g = L["w1"](x, effort)
            u = L["w3"](x, effort)
            f = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
            h = h + L["w2"](f, effort)
        return (_rms(h, self.norm, a.norm_eps) @ self.lm_head).astype(np.float32)


def tiny_random(args: ModelArgs | None = None, seed: int = 0) -> Model:
    """A random model with the given shapes (weights ~ N(0, 1/n_in), some channel outliers)."""
    a = args or ModelArgs()
    rng = np.random.default_rng(seed)
    kv = a.dim // a.n_heads * a.n_kv_heads

    def mat(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float16)

    w = {
        "embed": rng.standard_normal((a.vocab_size, a.dim)).astype(np.float32),
        "norm": np.ones(a.dim, np.float32),
    }
    for i in range(a.n_layers):
        p = f"layers.{i}."
        w.update(
            {
                p + "attn.wq": mat(a.dim, a.dim),
                p + "attn.wk": mat(a.dim, kv),
                p + "attn.wv": mat(a.dim, kv),
                p + "attn.wo": mat(a.dim, a.dim),
                p + "ffn.w1": mat(a.dim, a.hidden_dim),
                p + "ffn.w3": mat(a.dim, a.hidden_dim),
                p + "ffn.w2": mat(a.hidden_dim, a.dim),
            }
        )
        w[p + "attn_norm"] = (1.0 + rng.random(a.dim)).astype(np.float32)
        w[p + "ffn_norm"] = (1.0 + rng.random(a.dim)).astype(np.float32)
    return Model(a, w)


from pyeffort.models.loaders.gguf import NAMES as GGUF_NAMES  # noqa: E402  (one table)


def from_gguf(path: str) -> Model:
    """A Llama GGUF file (weights dequantised to float16) -> Model."""
    import gguf

    r = gguf.GGUFReader(path)

    def field(k):
        return r.fields[k].contents()

    a = ModelArgs(
        dim=int(field("llama.embedding_length")),
        n_layers=int(field("llama.block_count")),
        n_heads=int(field("llama.attention.head_count")),
        n_kv_heads=int(field("llama.attention.head_count_kv")),
        hidden_dim=int(field("llama.feed_forward_length")),
        vocab_size=len(r.fields["tokenizer.ggml.tokens"].data),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base")),
    )
    w = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # (n_out, n_in) as GGUF stores it
        if t.name == "token_embd.weight":
            w["embed"] = arr.astype(np.float32)
        elif t.name == "output_norm.weight":
            w["norm"] = arr
        elif t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            key = f"layers.{i}.{GGUF_NAMES[kind]}"
            w[key] = arr if arr.ndim == 1 else arr.T.astype(np.float16)
    return Model(a, w)


def gguf_tokenizer(path: str):
    """The GGUF's byte-level BPE vocabulary as a ``tokenizers.Tokenizer``."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(path)
    toks = [
        bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
        for i in r.fields["tokenizer.ggml.tokens"].data
    ]
    merges = [
        bytes(r.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8")
        for i in r.fields["tokenizer.ggml.merges"].data
    ]
    bpe = models.BPE({t: i for i, t in enumerate(toks)}, [tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
