"""Weight sources: a Hugging Face checkpoint folder or a GGUF file, read tensor by tensor.

A source has ``args`` (ModelArgs), ``tokenizer`` (Tokenizer), and ``get(name)`` giving one tensor
under our names (see pyeffort.models.llama, and pyeffort.models.moe for a mixture of experts):
matrices as float (n_in, n_out), norms (dim,), ``embed`` (vocab, dim), ``lm_head`` (dim, vocab)
when not tied, q/k/v biases (n_out,) when ``args.qkv_bias``, a MoE layer's ``router``
(dim, n_experts).
"""

from __future__ import annotations

from pathlib import Path

from pyeffort.models.args import ModelArgs
from pyeffort.models.llama import ATTN, BIAS, FFN


def matrix_names(args: ModelArgs) -> list[str]:
    out = []
    for i in range(args.n_layers):
        out += [f"layers.{i}.attn.{n}" for n in ATTN]
        ffns = [f"ffn.experts.{e}." for e in range(args.n_experts)] if args.n_experts else ["ffn."]
        out += [f"layers.{i}.{f}{n}" for f in ffns for n in FFN]
    return out


def plain_names(args: ModelArgs) -> list[str]:
    out = ["embed", "norm"] + ([] if args.tie_embeddings else ["lm_head"])
    for i in range(args.n_layers):
        out += [f"layers.{i}.attn_norm", f"layers.{i}.ffn_norm"]
        out += [f"layers.{i}.attn.{n}" for n in BIAS] if args.qkv_bias else []
        out += [f"layers.{i}.router"] if args.n_experts else []
    return out


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
