"""ModelArgs: the shape of a Llama-family model, and named configs (gpt-fast style)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


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
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    architecture: str = "llama"

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not a multiple of n_kv_heads")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        """From a Hugging Face ``config.json`` (LlamaForCausalLM / MistralForCausalLM)."""
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
            raise ValueError(f"unsupported architecture {arch!r} (Llama or Mistral only)")
        if c.get("rope_scaling"):
            raise ValueError("rope_scaling is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c.get('hidden_act')!r} is not supported (silu only)")
        n_heads = c["num_attention_heads"]
        theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 1e4)
        return cls(
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            hidden_dim=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            head_dim=c.get("head_dim") or 0,
            sliding_window=c.get("sliding_window") or 0,
            max_seq_len=c.get("max_position_embeddings", 8192),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            architecture="mistral" if arch.startswith("Mistral") else "llama",
        )


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
    "SmolLM2-135M": {
        "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "hidden_dim": 1536, "vocab_size": 49152,
        "norm_eps": 1e-5, "rope_theta": 1e5, "max_seq_len": 8192, "tie_embeddings": True,
    },
}  # fmt: skip


def config(name: str) -> ModelArgs:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    return ModelArgs(**CONFIGS[name])
