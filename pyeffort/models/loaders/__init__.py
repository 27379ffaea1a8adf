"""Weight sources: a Hugging Face checkpoint folder or a GGUF file, read tensor by tensor.

A source has ``args`` (ModelArgs), ``tokenizer`` (Tokenizer), and ``get(name)`` giving one tensor
under our names (see pyeffort.models.llama): matrices as float (n_in, n_out), norms (dim,),
``embed`` (vocab, dim), ``lm_head`` (dim, vocab) when not tied.
"""

from __future__ import annotations

from pathlib import Path

from pyeffort.models.args import ModelArgs
from pyeffort.models.llama import ATTN, FFN


def matrix_names(args: ModelArgs) -> list[str]:
    out = []
    for i in range(args.n_layers):
        out += [f"layers.{i}.attn.{n}" for n in ATTN] + [f"layers.{i}.ffn.{n}" for n in FFN]
    return out


def plain_names(args: ModelArgs) -> list[str]:
    out = ["embed", "norm"] + ([] if args.tie_embeddings else ["lm_head"])
    for i in range(args.n_layers):
        out += [f"layers.{i}.attn_norm", f"layers.{i}.ffn_norm"]
    return out


def tensor_shape(args: ModelArgs, name: str) -> tuple[int, ...]:
    """The shape ``get(name)`` returns: matrices (n_in, n_out), ``embed`` (vocab, dim),
    ``lm_head`` (dim, vocab), norms (dim,)."""
    d, h, hd = args.dim, args.hidden_dim, args.head_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    if name in ("embed", "lm_head"):
        return (args.vocab_size, d) if name == "embed" else (d, args.vocab_size)
    mats = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, h), "w3": (d, h),
            "w2": (h, d)}  # fmt: skip
    return mats.get(name.rsplit(".", 1)[-1], (d,))  # else a norm


def open_source(path):
    """A GGUF file or a Hugging Face folder (config.json + safetensors) -> a source."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from pyeffort.models.loaders.gguf import GGUFSource

        return GGUFSource(p)
    if p.is_dir() and (p / "config.json").exists():
        from pyeffort.models.loaders.hf import HFSource

        return HFSource(p)
    raise ValueError(f"{path}: neither a .gguf file nor a Hugging Face folder with config.json")
