"""Model configurations are checked, never run wrongly: ModelArgs refuses values the forward pass
cannot run; the Hugging Face and GGUF loaders refuse every key or tensor that changes the
computation and that pyeffort does not implement (dynamic RoPE, o/MLP biases, ...), naming it;
(Qwen2 and the implemented RoPE scalings: test_model_families.py); float64
checkpoints convert; the model's context (max_seq_len) is enforced."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_model_hf import prompt_ids, write_gguf, write_tiny_mistral

from pyeffort.models import ModelArgs, from_source
from pyeffort.models.args import ConfigError
from pyeffort.models.generate import ContextError, fit_context, generate
from pyeffort.models.loaders import open_source

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}  # fmt: skip


# ------------------------------------------------------------ ModelArgs


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"n_heads": 6, "n_kv_heads": 4, "dim": 96}, "multiple of n_kv_heads"),
        ({"norm_eps": "abc"}, "norm_eps"),
        ({"norm_eps": float("nan")}, "norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"dim": -64}, "dim"),
        ({"n_layers": 2.5}, "n_layers"),
        ({"vocab_size": True}, "vocab_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"dim": 100, "n_heads": 8, "n_kv_heads": 8}, "multiple of n_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"architecture": "gpt2"}, "architecture"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ],
)
def test_model_args_refuse_what_cannot_run(bad, word):
    with pytest.raises(ConfigError, match=word):
        ModelArgs(**bad)


def test_model_args_from_dict_checks_its_input():
    good = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=100)
    d = json.loads(good.to_json())
    assert ModelArgs.from_dict(d) == good
    with pytest.raises(ConfigError, match="JSON object"):
        ModelArgs.from_dict([d])
    with pytest.raises(ConfigError, match="logit_softcap"):  # a newer pyeffort's key
        ModelArgs.from_dict({**d, "logit_softcap": 30.0})
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):  # never the 32000 default
        ModelArgs.from_dict(d)


# ------------------------------------------------------------ Hugging Face config.json


def _open_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return open_source(tmp_path)


def _transformers_config(tmp_path, cls: str, **kw) -> dict:
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, cls)(**TINY, **kw)
    cfg.architectures = [cls.replace("Config", "ForCausalLM")]
    cfg.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}},
         "longrope"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_transformers_configs_that_change_the_math_are_refused(tmp_path, kw, word):
    cfg = _transformers_config(tmp_path, "LlamaConfig", **kw)
    with pytest.raises(ConfigError, match=word):
        _open_config(tmp_path, cfg)


@pytest.mark.parametrize("cls", ["LlamaConfig", "MistralConfig"])
def test_plain_transformers_configs_are_accepted(tmp_path, cls):
    cfg = _transformers_config(tmp_path, cls)
    from pyeffort.models.loaders.hf import args_from_config

    a = args_from_config(cfg)
    assert (a.dim, a.n_heads, a.n_kv_heads, a.head_dim) == (64, 4, 2, 16)
    assert a.architecture == cls[:-6].lower()


@pytest.mark.parametrize(
    "change, word",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                              "short_factor": [1.0]}}, "short_factor"),
        ({"rope_interleaved": True}, "rope_interleaved"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
        ({"logit_scale": 2.0}, "logit_scale"),  # unknown and switched on
        ({"num_key_value_heads": 0}, "n_kv_heads"),
        ({"rms_norm_eps": "abc"}, "norm_eps"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of n_kv_heads"),
        ({"hidden_size": 0}, "dim"),
        ({"architectures": ["Qwen3ForCausalLM"]}, "architecture"),
    ],
)
def test_config_keys_are_checked(tmp_path, change, word):
    base = {"architectures": ["LlamaForCausalLM"], **TINY, "rms_norm_eps": 1e-5,
            "some_unused_flag": None, "other_flag": False}  # fmt: skip
    with pytest.raises(ConfigError, match=word):
        _open_config(tmp_path, {**base, **change})


def test_config_that_is_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        _open_config(tmp_path, [TINY])


def test_float64_checkpoint_converts(tmp_path):
    write_tiny_mistral(tmp_path / "f32", seed=2)
    write_tiny_mistral(tmp_path / "f64", seed=2, dtype=np.float64)
    a, b = from_source(tmp_path / "f32"), from_source(tmp_path / "f64")
    ids = prompt_ids(a)
    np.testing.assert_array_equal(a.forward(ids, 0, 1.0), b.forward(ids, 0, 1.0))


def test_integer_checkpoint_is_refused(tmp_path):
    write_tiny_mistral(tmp_path, dtype=np.int32)
    with pytest.raises(ConfigError, match="int32"):
        from_source(tmp_path)


def test_tensor_shape_must_match_the_config(tmp_path):
    cfg = write_tiny_mistral(tmp_path)
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mlp"):
        from_source(tmp_path)


# ------------------------------------------------------------ GGUF metadata


def _gguf(tmp_path, extra):
    write_tiny_mistral(tmp_path / "hf", window=None, seed=5)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", extra)
    return tmp_path / "m.gguf"


def _bias(w):
    w.add_tensor("blk.0.attn_q.bias", np.zeros(64, np.float32))


def _rope_freqs(w):
    w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))


@pytest.mark.parametrize(
    "extra, word",
    [
        (lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LONGROPE),
                    w.add_rope_scaling_factor(2.0)), "rope.scaling"),  # fmt: skip
        (lambda w: w.add_uint32("llama.expert_count", 8), "expert_count"),
        (lambda w: w.add_float32("llama.attention.clamp_kqv", 8.0), "clamp_kqv"),
        (lambda w: (_rope_freqs(w), w.add_rope_scaling_factor(4.0)), "rope_freqs"),
        (_bias, "attn_q.bias"),
    ],
)
def test_gguf_keys_that_change_the_math_are_refused(tmp_path, extra, word):
    pytest.importorskip("gguf")
    with pytest.raises(ConfigError, match=word):
        open_source(_gguf(tmp_path, extra))


def test_gguf_neutral_keys_are_accepted(tmp_path):
    gguf = pytest.importorskip("gguf")

    def neutral(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_uint32("llama.expert_count", 0)

    assert open_source(_gguf(tmp_path, neutral)).args.head_dim == 16


# ------------------------------------------------------------ the context


def test_context_is_enforced(tmp_path):
    write_tiny_mistral(tmp_path, window=None)
    m = from_source(tmp_path)
    ctx = m.args.max_seq_len
    assert ctx == 256
    ids = (prompt_ids(m) * 20)[: ctx - 10]
    with pytest.raises(ContextError, match=f"{ctx}"):
        list(generate(m, ids, max_tokens=20, stop=[]))
    assert fit_context(m, len(ids), 20) == 10
    assert len(list(generate(m, ids, max_tokens=10, stop=[]))) == 10
    with pytest.raises(ContextError, match=f"{ctx}"):
        fit_context(m, ctx, 1)
    m.forward(ids, 0, 1.0)
    with pytest.raises(ValueError, match="context"):  # the forward pass itself refuses
        m.forward([1] * 11, len(ids), 1.0)
