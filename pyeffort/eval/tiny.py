"""A tiny random Llama on ``pyeffort.models`` for tests and smoke runs of the harness."""

from __future__ import annotations

import numpy as np

from pyeffort.models import Model, ModelArgs

TINY = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96,
    max_seq_len=1024, tie_embeddings=True,
)  # fmt: skip


def tiny_random(args: ModelArgs | None = None, seed: int = 0) -> Model:
    """A ``pyeffort.models.Model`` with random weights (W ~ N(0, 1/n_in), float16 buckets)."""
    import pyeffort

    a = args or TINY
    rng = np.random.default_rng(seed)
    hd = a.head_dim
    shapes = {
        "attn.wq": (a.dim, a.n_heads * hd),
        "attn.wk": (a.dim, a.n_kv_heads * hd),
        "attn.wv": (a.dim, a.n_kv_heads * hd),
        "attn.wo": (a.n_heads * hd, a.dim),
        "ffn.w1": (a.dim, a.hidden_dim),
        "ffn.w3": (a.dim, a.hidden_dim),
        "ffn.w2": (a.hidden_dim, a.dim),
    }
    w = {
        "embed": rng.standard_normal((a.vocab_size, a.dim)).astype(np.float32),
        "norm": np.ones(a.dim, np.float32),
    }
    if not a.tie_embeddings:
        w["lm_head"] = rng.standard_normal((a.dim, a.vocab_size)).astype(np.float16)
    for i in range(a.n_layers):
        p = f"layers.{i}."
        for name, (n_in, n_out) in shapes.items():
            m = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float16)
            w[p + name] = pyeffort.build_buckets(m)
        w[p + "attn_norm"] = (1.0 + rng.random(a.dim)).astype(np.float32)
        w[p + "ffn_norm"] = (1.0 + rng.random(a.dim)).astype(np.float32)
    return Model(a, w)
