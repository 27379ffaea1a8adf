"""A Hugging Face checkpoint folder (LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
MixtralForCausalLM, whose experts are stored one by one: ``block_sparse_moe.experts.{e}.w1``...):
config.json, ``*.safetensors`` shards (with ``model.safetensors.index.json``), and tokenizer.json or
tokenizer.model. Tensors are memory-mapped and read one at a time.

config.json is read against an allow-list (``args_from_config``): a key pyeffort reads, a key
that must hold its neutral value (no MLP biases...), or a key that does not change the forward
pass; RoPE scalings are read by ``rope_scaling.from_hf_config``. Anything else is refused with a ConfigError naming it, never run wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pyeffort.fileformat import Reader
from pyeffort.models.args import ConfigError, ModelArgs, tensor_shape
from pyeffort.models.loaders.rope_scaling import HF_ROPE_KEYS, from_hf_config
from pyeffort.models.tokenizer import Tokenizer, sentencepiece_from_file

LAYER = {
    "attn.wq": "self_attn.q_proj.weight",
    "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight",
    "attn.wo": "self_attn.o_proj.weight",
    "ffn.w1": "mlp.gate_proj.weight",
    "ffn.w3": "mlp.up_proj.weight",
    "ffn.w2": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "attn.bq": "self_attn.q_proj.bias",
    "attn.bk": "self_attn.k_proj.bias",
    "attn.bv": "self_attn.v_proj.bias",
}
TOP = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def hf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, i, rest = name.split(".", 2)
    if rest == "router":
        return f"model.layers.{i}.block_sparse_moe.gate.weight"
    if rest.startswith("ffn.experts."):  # ffn.experts.{e}.w1: Mixtral's names are ours
        return f"model.layers.{i}.block_sparse_moe.{rest[4:]}.weight"
    return f"model.layers.{i}.{LAYER[rest]}"


class HFSource:
    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.config = json.loads((self.folder / "config.json").read_text("utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{self.folder / 'config.json'}: not valid JSON ({exc})") from None
        self.args = args_from_config(self.config)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise ValueError(f"{folder}: no *.safetensors files")
            files = {n: s.name for s in shards for n in Reader(s).tensors}
        self.files = files
        self._readers: dict[str, Reader] = {}
        if not self.args.tie_embeddings and "lm_head.weight" not in files:
            self.args.tie_embeddings = True
        self.tokenizer = load_tokenizer(self.folder, self.config)

    def get(self, name: str) -> np.ndarray:
        key = hf_name(name)
        if key not in self.files:
            raise ValueError(f"{self.folder}: tensor {key} missing")
        shard = self.files[key]
        if shard not in self._readers:
            self._readers[shard] = Reader(self.folder / shard)
        r = self._readers[shard]
        a = float32(r.array(key), r.info(key).dtype, f"{self.folder / shard}: {key}")
        ours = tensor_shape(self.args, name)
        plain = name == "embed" or len(ours) == 1
        theirs = ours if plain else ours[::-1]  # nn.Linear keeps (n_out, n_in)
        if a.shape != theirs:
            raise ConfigError(f"{self.folder / shard}: {key} has shape {a.shape}, config.json "
                              f"implies {theirs}")  # fmt: skip
        return a if plain else a.T

def float32(a, dtype: np.dtype, where: str) -> np.ndarray:
    """A checkpoint tensor (float32, float16, bfloat16 bits or float64) as float32."""
    if dtype == np.uint16:  # bfloat16 bits
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    if dtype not in (np.float32, np.float16, np.float64):
        raise ConfigError(f"{where}: dtype {dtype} is not a float checkpoint dtype "
                          "(float32, float16, bfloat16, float64; quantised ones: use a GGUF)")  # fmt: skip
    out = np.asarray(a, dtype=np.float32)
    if dtype == np.float64 and not np.isfinite(out).all() and np.isfinite(a).all():
        raise ConfigError(f"{where}: float64 values beyond the float32 range")
    return out


def load_tokenizer(folder: Path, config: dict) -> Tokenizer:
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):  # named templates
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    if tmpl is None and (folder / "chat_template.jinja").exists():
        tmpl = (folder / "chat_template.jinja").read_text()
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        impl, kind = HFTokenizer.from_file(str(folder / "tokenizer.json")), "tokenizers"
        tid = impl.token_to_id
    elif (folder / "tokenizer.model").exists():
        impl, kind = sentencepiece_from_file(folder / "tokenizer.model"), "sentencepiece"

        def tid(t):
            i = impl.piece_to_id(t)
            return None if i == impl.unk_id() and t != impl.id_to_piece(i) else i
    else:
        raise ValueError(f"{folder}: neither tokenizer.json nor tokenizer.model")
    bos = _special(tc.get("bos_token"), tid, config.get("bos_token_id"))
    eos = _special(tc.get("eos_token"), tid, config.get("eos_token_id"))
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # sentencepiece Llamas add BOS; a tokenizer.json says so itself
        add_bos = kind == "sentencepiece" or _post_adds_bos(impl, bos)
    return Tokenizer(impl, kind, bos, eos_ids, add_bos, tmpl)


def _post_adds_bos(impl, bos) -> bool:
    if bos is None:
        return False
    ids = impl.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def _special(tok, to_id, fallback):
    if isinstance(tok, dict):
        tok = tok.get("content")
    if isinstance(tok, str):
        i = to_id(tok)
        if i is not None:
            return int(i)
    return fallback


# ------------------------------------------------------------ config.json

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
         "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}  # fmt: skip
# keys that do not change the forward pass: metadata, training-only values, generation defaults
IGNORED = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "return_dict", "problem_type", "is_encoder_decoder",
    "chunk_size_feed_forward", "tokenizer_class", "torchscript", "use_bfloat16",
    "attention_dropout", "pretraining_tp", "is_llama_config", "transformers.js_config",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "num_return_sequences", "finetuning_task", "prefix",
    "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",  # MoE training only
}  # fmt: skip
# keys pyeffort implements only at one value: {key: (allowed values, what the key does)}
NEUTRAL = {
    "hidden_act": (("silu", "swish"), "the MLP activation"),
    "attention_bias": ((False, None), "biases on q, k, v, o"),
    "mlp_bias": ((False, None), "biases on the MLP matrices"),
    "rope_interleaved": ((False, None), "interleaved rotary pairs"),
    "partial_rotary_factor": ((1.0, 1, None), "rotary embedding on part of each head"),
    "use_sliding_window": ((False, None), "Qwen2's sliding window"),
}
MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768,
                 "mixtral": 131072}  # transformers' defaults  # fmt: skip


def args_from_config(c) -> ModelArgs:
    """ModelArgs from a Hugging Face ``config.json`` (LlamaForCausalLM / MistralForCausalLM /
    Qwen2ForCausalLM / MixtralForCausalLM); ConfigError for any key whose value pyeffort does not
    implement."""
    if not isinstance(c, dict):
        raise ConfigError(f"config.json must be a JSON object, got {type(c).__name__}")
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ConfigError(f"unsupported architecture {arch!r} (one of {sorted(ARCHS)})")
    kind = ARCHS[arch]
    moe = kind == "mixtral"
    if moe:  # transformers' Mixtral defaults
        c = {"rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2, **c}
    _check_keys(c, kind)
    n_heads = _need(c, "num_attention_heads")
    n_kv = c.get("num_key_value_heads")
    max_pos = c.get("max_position_embeddings", MAX_POSITIONS[kind])
    theta, scaling = from_hf_config(c, max_pos)
    try:
        return ModelArgs(
            dim=_need(c, "hidden_size"),
            n_layers=_need(c, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_heads if n_kv is None else n_kv,
            hidden_dim=_need(c, "intermediate_size"),
            vocab_size=_need(c, "vocab_size"),
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            head_dim=c.get("head_dim") or 0,
            sliding_window=(c.get("sliding_window") or 0) if kind in ("mistral", "mixtral") else 0,
            max_seq_len=max_pos,
            tie_embeddings=c.get("tie_word_embeddings", False),
            architecture=kind,
            qkv_bias=kind == "qwen2",  # transformers' Qwen2 always has q, k, v biases
            rope_scaling=scaling,
            n_experts=c["num_local_experts"] if moe else 0,
            n_experts_per_tok=c["num_experts_per_tok"] if moe else 0,
        )
    except ConfigError as exc:
        raise ConfigError(f"config.json: {exc}") from None


def _check_keys(c: dict, kind: str) -> None:
    read = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "head_dim",
            "sliding_window", "max_position_embeddings", "tie_word_embeddings",
            "original_max_position_embeddings", *HF_ROPE_KEYS,
            "num_local_experts", "num_experts_per_tok"}  # fmt: skip
    if kind == "qwen2":  # its window's layers: moot without use_sliding_window (NEUTRAL)
        read.add("max_window_layers")
    types = c.get("layer_types")  # transformers 5 writes it for Qwen2
    if types is not None and (
        not isinstance(types, list) or any(t != "full_attention" for t in types)
    ):
        raise ConfigError(f"config.json: layer_types={types!r}: only full_attention layers "
                          "are implemented by pyeffort")  # fmt: skip
    read.add("layer_types")
    for key, value in c.items():
        if key in read or key in IGNORED or key.startswith("_"):
            continue
        if key in NEUTRAL:
            allowed, what = NEUTRAL[key]
            if not _one_of(value, allowed):
                raise ConfigError(f"config.json: {key}={value!r} ({what}) is not implemented "
                                  f"by pyeffort (only {key}={allowed[0]!r})")  # fmt: skip
        elif not _one_of(value, (None, False, {}, [])):  # an unknown, switched-on setting
            raise ConfigError(f"config.json: {key}={value!r} is not known to pyeffort and may "
                              "change the computation; refusing rather than running it wrongly")  # fmt: skip


def _one_of(value, allowed) -> bool:
    """value equals one of ``allowed`` with the same type (so 0 is not False, True not 1)."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _need(c: dict, key: str):
    if key not in c:
        raise ConfigError(f"config.json lacks {key!r}")
    return c[key]
