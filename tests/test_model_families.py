"""Model families beyond plain Llama/Mistral: Qwen2 (q/k/v biases) and the RoPE scalings (linear,
Llama 3, YaRN), each a tiny random model made with transformers' config classes, saved as a Hugging
Face folder (and written as GGUF the way llama.cpp's converter writes it), checked against
transformers at effort 1.0: prefill and KV-cache decode logits within REL_TOL * max |logit| (as
test_model_hf), greedy tokens identical, positions past original_max_position_embeddings. Anything
else is refused, naming it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from test_model_hf import _permute, _train_bpe_json

from pyeffort.models import convert as conv
from pyeffort.models import from_source, load
from pyeffort.models.args import ConfigError, ModelArgs
from pyeffort.models.generate import generate
from pyeffort.models.loaders import open_source
from pyeffort.models.rope import Rope

REL_TOL = 1e-3
ORIGINAL = 32  # original_max_position_embeddings of the scaled models
N_PROMPT, N_NEW = 48, 16  # positions up to 63, past ORIGINAL
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
CASES = {  # name: (config class, its keyword arguments)
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2-yarn": (
        "Qwen2Config",
        {
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-llama3": ("LlamaConfig", {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}}),
    "llama-yarn": ("LlamaConfig", {"rope_parameters": {**YARN, "rope_theta": 1e4}}),
    "llama-yarn-mscale": (
        "LlamaConfig",
        {
            "rope_parameters": {
                **YARN,
                "rope_theta": 1e4,
                "mscale": 0.8,
                "mscale_all_dim": 0.5,
                "beta_fast": 16,
                "truncate": False,
            }
        },
    ),
}


def write_tiny(folder, cls: str, seed: int = 0, **kw):
    """A random model of transformers' config class ``cls`` saved as a Hugging Face folder
    (safetensors, float16-representable weights, a byte-level BPE tokenizer.json)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _train_bpe_json(folder / "tokenizer.json", vocab=300)  # with merges
    cfg = getattr(transformers, cls)(**TINY, vocab_size=vocab, bos_token_id=1, eos_token_id=2, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                r = 1 + 0.1 * r
            elif name.endswith("bias"):
                r = 0.5 * r
            elif "embed" not in name:
                r = r / math.sqrt(p.shape[-1])
            p.copy_(r.half().float())
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, folder, transformers model as saved, our model from the folder)"""
    folder = tmp_path_factory.mktemp(request.param)
    cls, kw = CASES[request.param]
    write_tiny(folder, cls, seed=len(request.param), **kw)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return request.param, folder, hf, from_source(folder)


def _ids(model, n: int = N_PROMPT) -> list[int]:
    return np.random.default_rng(7).integers(3, model.args.vocab_size, n).tolist()


def _reference(hf, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def _check_logits(model, ids, ref) -> None:
    """Prefill and one-token decode (the KV cache) both within tolerance of ``ref``."""
    tol = REL_TOL * np.abs(ref).max()
    np.testing.assert_allclose(model.forward(ids, 0, 1.0), ref, rtol=0, atol=tol)
    model.reset()
    steps = np.array([model.forward([t], i, 1.0)[0] for i, t in enumerate(ids)])
    np.testing.assert_allclose(steps, ref, rtol=0, atol=tol)


def test_family_matches_transformers(case):
    name, _, hf, ours = case
    assert ours.args.architecture == name.split("-")[0]
    assert ours.args.qkv_bias == name.startswith("qwen2")
    ids = _ids(ours)
    _check_logits(ours, ids, _reference(hf, ids))
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            pad_token_id=0,
        )
    assert list(generate(ours, ids, max_tokens=N_NEW, stop=[])) == out[0, len(ids) :].tolist()


def test_the_family_feature_matters(case):
    """Without the scaling (or the biases) our logits leave the tolerance: the comparison above
    pins them."""
    _, _, hf, ours = case
    ids = _ids(ours)
    ref = _reference(hf, ids)
    tol = REL_TOL * np.abs(ref).max()
    attn = [b.attn for b in ours.layers]
    saved = attn[0].rope, [a.bias for a in attn]
    try:
        if ours.args.rope_scaling is not None:
            plain = Rope(dataclasses.replace(ours.args, rope_scaling=None))
            for a in attn:
                a.rope = plain
        else:
            for a in attn:
                a.bias = None
        assert np.abs(ours.forward(ids, 0, 1.0) - ref).max() > 10 * tol
    finally:
        for a, bias in zip(attn, saved[1], strict=True):
            a.rope, a.bias = saved[0], bias


def test_converted_family_roundtrip(case, tmp_path):
    """The converted folder keeps the biases and rope_scaling: the same logits."""
    _, folder, _, ours = case
    m = load(conv.convert(folder, tmp_path / "conv", progress=False))
    assert m.args == ours.args
    ids = _ids(ours, 40)
    np.testing.assert_array_equal(m.forward(ids, 0, 1.0), ours.forward(ids, 0, 1.0))


# ------------------------------------------------------------ GGUF, as llama.cpp writes it


def write_gguf(folder, path, arch: str, rope=None, skip=(), pre="smollm") -> None:
    """The HF folder as a GGUF of ``arch`` (F32 tensors, llama's q/k rows permuted, qwen2's
    biases) less the tensors named in ``skip``; ``rope(writer)`` adds RoPE metadata or
    tensors."""
    gguf = pytest.importorskip("gguf")
    from pyeffort.models.loaders.hf import HFSource

    src = HFSource(folder)
    a = src.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    tok = json.loads((folder / "tokenizer.json").read_text())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tok["vocab"]))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["merges"]])
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tok["vocab"]])
    names = {
        "attn.wq": "attn_q",
        "attn.wk": "attn_k",
        "attn.wv": "attn_v",
        "attn.wo": "attn_output",
        "ffn.w1": "ffn_gate",
        "ffn.w3": "ffn_up",
        "ffn.w2": "ffn_down",
        "attn_norm": "attn_norm",
        "ffn_norm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", src.get("embed"))
    w.add_tensor("output_norm.weight", src.get("norm"))
    if not a.tie_embeddings:
        w.add_tensor("output.weight", np.ascontiguousarray(src.get("lm_head").T))
    for i in range(a.n_layers):
        for ours, theirs in names.items():
            t = src.get(f"layers.{i}.{ours}")
            t = np.ascontiguousarray(t.T) if t.ndim == 2 else t  # GGUF keeps (n_out, n_in)
            if arch == "llama" and ours in ("attn.wq", "attn.wk"):
                t = _permute(t, a.n_heads if ours == "attn.wq" else a.n_kv_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(t, dtype=np.float32))
        for b, theirs in (("bq", "attn_q"), ("bk", "attn_k"), ("bv", "attn_v")):
            if a.qkv_bias and f"blk.{i}.{theirs}.bias" not in skip:
                w.add_tensor(f"blk.{i}.{theirs}.bias", src.get(f"layers.{i}.attn.{b}"))
    if rope is not None:
        rope(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _yarn(w):
    gguf = pytest.importorskip("gguf")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(ORIGINAL)


def _linear(w):
    gguf = pytest.importorskip("gguf")
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)


def _llama3_freqs(w, theta=5e5, hd=16):
    """llama.cpp's convert_hf_to_gguf: Llama 3.1's scaling as a rope_freqs tensor of divisors."""
    p = LLAMA3
    factors = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * theta ** (i / hd)
        if wavelen < ORIGINAL / p["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > ORIGINAL / p["low_freq_factor"]:
            factors.append(p["factor"])
        else:
            smooth = (ORIGINAL / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    w.add_tensor("rope_freqs.weight", np.array(factors, np.float32))


GGUF_CASES = {  # HF case: (GGUF architecture, its RoPE metadata)
    "qwen2": ("qwen2", None),
    "qwen2-yarn": ("qwen2", _yarn),
    "llama-linear": ("llama", _linear),
    "llama-llama3": ("llama", _llama3_freqs),
    "llama-yarn": ("llama", _yarn),
}


def test_gguf_family_matches_transformers(case, tmp_path):
    name, folder, hf, ours = case
    if name not in GGUF_CASES:
        pytest.skip("no llama.cpp metadata for YaRN's mscale / beta / truncate keys")
    arch, rope = GGUF_CASES[name]
    write_gguf(folder, tmp_path / "m.gguf", arch, rope)
    gg = from_source(tmp_path / "m.gguf")
    assert (gg.args.architecture, gg.args.qkv_bias) == (arch, arch == "qwen2")
    ids = _ids(gg)
    ref = _reference(hf, ids)
    _check_logits(gg, ids, ref)
    assert list(generate(gg, ids, max_tokens=N_NEW, stop=[])) == list(
        generate(ours, ids, max_tokens=N_NEW, stop=[])
    )


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # Qwen2's tokenizer.json


def _qwen2_tokenizer(path) -> None:
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer, as its tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(2)
    words = ["the", "cat's", "sat", "on", "mat", "2024", "we'll", "\n", "  ", "caf\u00e9", "!!"]
    lines = [
        "".join(rng.choice(words, 12)) + " " + " ".join(rng.choice(words, 6)) for _ in range(300)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    tok.save(str(path))


def test_gguf_qwen2_tokenizer_splits_as_its_tokenizer_json(tmp_path):
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    write_tiny(tmp_path / "hf", "Qwen2Config")
    _qwen2_tokenizer(tmp_path / "hf" / "tokenizer.json")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "qwen2", pre="qwen2")
    ours = open_source(tmp_path / "m.gguf").tokenizer
    ref = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in (
        "the cat's sat on 2024 mats!!\n\nwe'll  see",
        "Caf\u00e9 12345 THE'S",
        "cafe\u0301 \t x\r\n",
        "  leading and trailing  ",
    ):
        assert ours.encode(text) == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text).ids)


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "cls, kw, word",
    [
        ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        (
            "LlamaConfig",
            {
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "factor": 2.0,
                    "original_max_position_embeddings": 32,
                }
            },
            "longrope",
        ),
        (
            "Qwen2Config",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
            "sliding",
        ),
        ("Qwen2Config", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ("LlamaConfig", {"attention_bias": True}, "attention_bias"),  # o's bias too
    ],
)
def test_other_families_are_refused(tmp_path, cls, kw, word):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, cls)(**TINY, vocab_size=100, **kw)
    cfg.architectures = [cls.replace("Config", "ForCausalLM")]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=word):
        open_source(tmp_path)


def _config(tmp_path, **change):
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    return tmp_path


@pytest.mark.parametrize(
    "change, word",
    [
        ({"rope_scaling": {**YARN, "short_factor": [1.0]}}, "short_factor"),
        (
            {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
            "low_freq_factor",
        ),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 0.5}}, "high_freq_factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor"),
        (
            {"rope_scaling": {**YARN, "factor": None, "original_max_position_embeddings": 0}},
            "original_max_position_embeddings",
        ),
        ({"rope_scaling": {**YARN, "truncate": "no"}}, "truncate"),
        ({"rope_scaling": {**YARN, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        (
            {
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "rope_parameters": {"rope_type": "linear", "factor": 4.0},
            },
            "differ",
        ),
        ({"rope_scaling": {"rope_type": "linear", "type": "yarn", "factor": 2.0}}, "yarn"),
    ],
)
def test_bad_rope_configs_are_refused(tmp_path, change, word):
    with pytest.raises(ConfigError, match=word):
        open_source(_config(tmp_path, **change))


def test_yarn_config_reads_as_transformers(tmp_path):
    """The defaults transformers fills in: factor from the contexts, original context from
    max_position_embeddings, beta_fast / beta_slow, the attention factor from mscale."""
    from pyeffort.models.loaders.hf import args_from_config

    c = json.loads(
        _config(
            tmp_path,
            max_position_embeddings=128,
            rope_parameters={
                "rope_type": "yarn",
                "factor": None,
                "original_max_position_embeddings": 32,
                "mscale": 1.0,
                "mscale_all_dim": 0.0,
                "rope_theta": 5e5,
            },
        )
        .joinpath("config.json")
        .read_text()
    )
    a = args_from_config(c)
    assert a.rope_theta == 5e5
    assert a.rope_scaling == {
        "type": "yarn",
        "factor": 4.0,
        "original_context": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": 0.1 * math.log(4.0) + 1,
        "truncate": True,
    }
    c["rope_parameters"] = {
        "rope_type": "llama3",
        **{k: LLAMA3[k] for k in ("factor", "low_freq_factor", "high_freq_factor")},
    }
    assert args_from_config(c).rope_scaling["original_context"] == 128


@pytest.mark.parametrize(
    "scaling, word",
    [
        ({"type": "ntk", "factor": 2.0}, "ntk"),
        ({"type": "linear"}, "keys"),
        ({"type": "linear", "factor": 2.0, "extra": 1}, "keys"),
        ({"type": "linear", "factor": float("inf")}, "factor"),
        ({"type": "freq_factors", "factors": [1.0] * 3}, "factors"),
        ({"type": "freq_factors", "factors": [1.0] * 7 + [0.0]}, "factors"),
        ("linear", "rope_scaling"),
    ],
)
def test_model_args_check_rope_scaling(scaling, word):
    with pytest.raises(ConfigError, match=word):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=2, rope_scaling=scaling)


def _qwen2_gguf(tmp_path, rope=None, skip=()):
    write_tiny(tmp_path / "hf", "Qwen2Config")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "qwen2", rope, skip)
    return tmp_path / "m.gguf"


@pytest.mark.parametrize(
    "rope, word",
    [
        (lambda w: (_yarn(w), w.add_rope_scaling_yarn_attn_factor(2.0)), "yarn_attn_factor"),
        (lambda w: (_yarn(w), w.add_rope_scaling_attn_factors(0.5)), "attn_factor"),
        (lambda w: (_yarn(w), w.add_rope_scaling_yarn_ext_factor(0.5)), "ext_factor"),
        (
            lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LONGROPE),
            "longrope",
        ),
        (lambda w: (_llama3_freqs(w), _yarn(w)), "rope_freqs"),
        (lambda w: w.add_float32("qwen2.rope.scaling.alpha", 1000.0), "alpha"),
        (
            lambda w: w.add_tensor("blk.0.attn_output.bias", np.zeros(64, np.float32)),
            "attn_output.bias",
        ),
    ],
)
def test_gguf_refusals(tmp_path, rope, word):
    pytest.importorskip("gguf")
    with pytest.raises(ConfigError, match=word):
        open_source(_qwen2_gguf(tmp_path, rope))


def test_gguf_qwen2_needs_its_biases(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(ConfigError, match=r"layer 1 .*attn\.bk"):
        open_source(_qwen2_gguf(tmp_path, skip={"blk.1.attn_k.bias"}))


def test_torch_forward_runs_the_family(case):
    """The torch forward pass (llama_torch, the GPU path's code run on the CPU) takes the
    family's biases and RoPE tables from the numpy model: the same logits, prefill and decode."""
    pytest.importorskip("torch")
    from pyeffort.models.llama_torch import TorchModel

    _, _, _, ours = case
    ids = _ids(ours)
    ours.reset()
    ref = ours.forward(ids, 0, 1.0)
    twin = TorchModel(ours, "cpu", capacity=8)  # grows past the original context while decoding
    tol = 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(twin.forward(ids, 0, 1.0), ref, rtol=0, atol=tol)
    twin.reset()
    steps = np.array([twin.forward([t], i, 1.0)[0] for i, t in enumerate(ids)])
    np.testing.assert_allclose(steps, ref, rtol=0, atol=tol)
