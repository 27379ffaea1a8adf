"""ModelArgs: the shape of a Llama-family model (Llama, Mistral, Qwen2), and named configs
(gpt-fast style).

Every way of building one (a named config, a loader, a converted model's manifest) goes through
``ModelArgs.__post_init__``, which refuses values the forward pass cannot run (ConfigError)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields

from pyeffort.errors import PyEffortError


class ConfigError(PyEffortError, ValueError):
    """A model's configuration is invalid, or asks for something pyeffort does not implement."""


ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral")
POSITIVE_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                 "max_seq_len")  # fmt: skip
COUNTS = ("head_dim", "sliding_window", "n_experts", "n_experts_per_tok")  # 0: derived / none
POSITIVE_FLOATS = ("norm_eps", "rope_theta")
SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")  # no default


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    hidden_dim: int = 14336  # SwiGLU inner size
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int = 0  # 0: dim // n_heads
    sliding_window: int = 0  # 0: none; else each token sees the last `sliding_window` positions
    max_seq_len: int = 8192  # the context: forward refuses positions at or past it
    tie_embeddings: bool = False
    architecture: str = "llama"
    qkv_bias: bool = False  # q, k, v have biases layers.{i}.attn.bq/bk/bv (Qwen2)
    rope_scaling: dict | None = None  # None: plain RoPE; else see check_rope_scaling
    n_experts: int = 0  # 0: a dense SwiGLU; else a mixture of experts (pyeffort.models.moe)
    n_experts_per_tok: int = 0  # experts routed per token (top-k), 1..n_experts when n_experts

    def __post_init__(self):
        for name in POSITIVE_INTS + COUNTS:
            setattr(self, name, _int(name, getattr(self, name), 1 if name in POSITIVE_INTS else 0))
        for name in POSITIVE_FLOATS:
            setattr(self, name, _positive_float(name, getattr(self, name)))
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} is odd (rotary pairs need it even)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")  # fmt: skip
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.head_dim)
        if not (1 if self.n_experts else 0) <= self.n_experts_per_tok <= self.n_experts:
            raise ConfigError(f"n_experts_per_tok={self.n_experts_per_tok} must lie in "
                              f"{min(1, self.n_experts)}..n_experts={self.n_experts}")  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        """From ``to_json``'s fields (a converted model's manifest): the shape fields must be
        there, and an unknown field is refused (it may come from a newer pyeffort whose models
        compute something this one does not)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config keys {unknown} are not known to this pyeffort")
        missing = [k for k in SHAPE if k not in d]
        if missing:
            raise ConfigError(f"config lacks {missing}")
        return cls(**d)


def _int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _positive_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


# ------------------------------------------------------------ RoPE scaling

# the keys of each kind of ``rope_scaling`` (all required; pyeffort.models.rope computes them):
ROPE_SCALINGS = {
    "linear": ("factor",),  # positions divided by factor
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_context"),
    "yarn": ("factor", "original_context", "beta_fast", "beta_slow", "attention_factor",
             "truncate"),
    "freq_factors": ("factors",),  # inv_freq[i] / factors[i] (llama.cpp's rope_freqs tensor)
}  # fmt: skip


def check_rope_scaling(d, head_dim: int) -> dict:
    """A ``rope_scaling`` dict checked: ``type`` one of ROPE_SCALINGS and exactly its keys,
    each a finite number > 0 (``original_context`` an integer, ``truncate`` a bool,
    ``factors`` head_dim/2 of them); -> a copy with floats as floats."""
    if not isinstance(d, dict) or d.get("type") not in ROPE_SCALINGS:
        kind = d.get("type") if isinstance(d, dict) else d
        raise ConfigError(f"rope_scaling type {kind!r} is not one of {tuple(ROPE_SCALINGS)}")
    keys = ROPE_SCALINGS[d["type"]]
    if set(d) != {"type", *keys}:
        raise ConfigError(f"rope_scaling {d['type']} takes the keys {keys}, got {sorted(d)}")
    out = {"type": d["type"]}
    for k in keys:
        v = d[k]
        if k == "truncate":
            if not isinstance(v, bool):
                raise ConfigError(f"rope_scaling truncate must be true or false, got {v!r}")
            out[k] = v
        elif k == "original_context":
            out[k] = _int(f"rope_scaling {k}", v, 1)
        elif k == "factors":
            if not isinstance(v, (list, tuple)) or len(v) != head_dim // 2:
                raise ConfigError(f"rope_scaling factors must be {head_dim // 2} numbers "
                                  f"(head_dim / 2), got {v!r:.80}")  # fmt: skip
            out[k] = [_positive_float("rope_scaling factors", f) for f in v]
        else:
            out[k] = _positive_float(f"rope_scaling {k}", v)
    if out["type"] == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError(f"rope_scaling llama3: high_freq_factor={out['high_freq_factor']} "
                          f"must exceed low_freq_factor={out['low_freq_factor']}")  # fmt: skip
    return out


CONFIGS = {
    "Mistral-7B-v0.1": {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "hidden_dim": 14336, "vocab_size": 32000,
        "norm_eps": 1e-5, "rope_theta": 1e4, "sliding_window": 4096, "max_seq_len": 32768,
        "architecture": "mistral",
    },
    "Mistral-7B-v0.2": {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "hidden_dim": 14336, "vocab_size": 32000,
        "norm_eps": 1e-5, "rope_theta": 1e6, "max_seq_len": 32768, "architecture": "mistral",
    },
    "Mistral-7B-v0.3": {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "hidden_dim": 14336, "vocab_size": 32768,
        "norm_eps": 1e-5, "rope_theta": 1e6, "max_seq_len": 32768, "architecture": "mistral",
    },
    "Mixtral-8x7B-v0.1": {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "hidden_dim": 14336, "vocab_size": 32000,
        "norm_eps": 1e-5, "rope_theta": 1e6, "max_seq_len": 32768, "architecture": "mixtral",
        "n_experts": 8, "n_experts_per_tok": 2,
    },
    "SmolLM2-135M": {
        "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "hidden_dim": 1536, "vocab_size": 49152,
        "norm_eps": 1e-5, "rope_theta": 1e5, "max_seq_len": 8192, "tie_embeddings": True,
    },
}  # fmt: skip


def config(name: str) -> ModelArgs:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    return ModelArgs(**CONFIGS[name])


def tensor_shape(args: ModelArgs, name: str) -> tuple[int, ...]:
    """The shape ``get(name)`` returns: matrices (n_in, n_out), ``embed`` (vocab, dim),
    ``lm_head`` (dim, vocab), a MoE layer's ``router`` (dim, n_experts), norms (dim,), biases
    (n_out,)."""
    d, h, hd = args.dim, args.hidden_dim, args.head_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    if name in ("embed", "lm_head"):
        return (args.vocab_size, d) if name == "embed" else (d, args.vocab_size)
    mats = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, h), "w3": (d, h),
            "w2": (h, d), "bq": (q,), "bk": (kv,), "bv": (kv,),
            "router": (d, args.n_experts)}  # fmt: skip
    return mats.get(name.rsplit(".", 1)[-1], (d,))  # else a norm
