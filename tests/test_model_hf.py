"""A tiny random Mistral (sliding window shorter than the prompt) saved as a Hugging Face folder
with a SentencePiece tokenizer trained here: loader, KV cache, converter, partial loads, and
logits against transformers (when installed).

Tolerance against transformers (fp32 reference): the random weights are rounded to float16 before
they are saved, so both sides hold the same weights and only the summation order differs:
max |logit difference| <= 1e-3 * max |logit| at effort 1.0.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

import pyeffort
from pyeffort import _backend
from pyeffort.models import convert as conv
from pyeffort.models import from_source, load
from pyeffort.models.generate import Stats, generate

WINDOW = 8
REL_TOL = 1e-3
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "sun",
    "rain",
    "blue",
    "red",
    "green",
    "house",
    "tree",
    "river",
    "stone",
    "bird",
    "sky",
]


def _train_spm(vocab: int = 120) -> bytes:
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's
    )  # fmt: skip
    return buf.getvalue()


def _train_bpe_json(path, vocab: int = 150) -> int:
    """A byte-level BPE tokenizer.json (tokenizers), BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return tok.get_vocab_size()


def write_tiny_mistral(
    folder, window: int | None = WINDOW, seed: int = 0, n_layers: int = 2, llama: bool = False,
    dtype=np.float32, chat_template: str | None = None, heads: tuple[int, int] = (4, 2),
    hidden: int = 128,
) -> dict:
    """A random MistralForCausalLM checkpoint folder (weights saved as ``dtype``); -> its
    config (``heads``: n_heads, n_kv_heads; ``hidden``: the feed-forward size)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if llama:
        vocab = _train_bpe_json(folder / "tokenizer.json")
    else:
        (folder / "tokenizer.model").write_bytes(_train_spm())
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        vocab = sp.get_piece_size()
    d, h, (n_heads, n_kv), hd = 64, hidden, heads, 16
    cfg = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": d,
        "intermediate_size": h, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": window, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip
    if llama:  # LlamaForCausalLM, no window, tied LM head
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True)
        del cfg["sliding_window"]
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if llama:  # the post-processor says it: no add_bos_token
        tc = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        tc["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):  # float16-representable float32
        s = scale if scale is not None else 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float16).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, d, scale=1.0), "lm_head.weight": w(vocab, d)}
    t["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(n_heads * hd, d)
        t[p + "self_attn.k_proj.weight"] = w(n_kv * hd, d)
        t[p + "self_attn.v_proj.weight"] = w(n_kv * hd, d)
        t[p + "self_attn.o_proj.weight"] = w(d, n_heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(h, d)
        t[p + "mlp.up_proj.weight"] = w(h, d)
        t[p + "mlp.down_proj.weight"] = w(d, h)
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(
            np.float32
        )
    if llama:
        del t["lm_head.weight"]
    names = sorted(t)
    half = len(names) // 2  # two shards and an index, as big checkpoints come
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    index = {"metadata": {}, "weight_map": {}}
    for fname, keys in shards.items():
        save_file({k: t[k].astype(dtype) for k in keys}, str(folder / fname),
                  metadata={"format": "pt"})  # fmt: skip
        index["weight_map"].update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mistral")
    write_tiny_mistral(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return from_source(tiny)


def prompt_ids(model, n: int = 20) -> list[int]:
    ids = model.tokenizer.encode(
        "the cat sat on the mat and the dog sat on the red house tree " * 2
    )
    assert len(ids) >= n
    return ids[:n]


def test_loader_reads_config_and_tokenizer(tiny, tiny_model):
    a = tiny_model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == (64, 2, 4, 2, 16)
    assert a.sliding_window == WINDOW and not a.tie_embeddings and a.architecture == "mistral"
    tok = tiny_model.tokenizer
    ids = tok.encode("the cat sat")
    assert ids[0] == tok.bos_id == 1 and tok.decode(ids) == "the cat sat"
    assert len(list(tiny_model.linears())) == 14
    names = [lin.name for lin in tiny_model.linears()][:7]
    assert names == [f"layers.0.attn.{n}" for n in ("wq", "wk", "wv", "wo")] + [
        f"layers.0.ffn.{n}" for n in ("w1", "w3", "w2")
    ]


def test_kv_cache_decode_equals_prefill(tiny_model):
    ids = prompt_ids(tiny_model)
    full = tiny_model.forward(ids, 0, 1.0)
    tiny_model.reset()
    steps = [tiny_model.forward([t], i, 1.0)[0] for i, t in enumerate(ids)]
    np.testing.assert_allclose(np.array(steps), full, rtol=0, atol=1e-3 * np.abs(full).max())
    # a call at start_pos 0 starts afresh, whatever the cache held
    np.testing.assert_array_equal(tiny_model.forward(ids, 0, 1.0), full)
    with pytest.raises(ValueError):
        tiny_model.forward(ids, 100, 1.0)


def test_decode_steps_same_on_both_backends(tiny_model):
    """Decoding runs norm, rope and attention as backend calls (decode.c or the numpy
    reference): both give the same logits, past the sliding window too."""
    ids = prompt_ids(tiny_model)
    assert len(ids) > WINDOW
    runs = []
    for name in _backend.NAMES:
        previous = _backend.use(name)
        try:
            tiny_model.reset()
            runs.append(np.array([tiny_model.forward([t], i, 0.6)[0] for i, t in enumerate(ids)]))
        finally:
            _backend.current = previous
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-4 * np.abs(runs[1]).max())


def test_prefill_without_dense_copy(tiny):
    m = from_source(tiny)
    ids = prompt_ids(m)
    for lin in m.linears():
        lin.prefill_dense = False
    a = m.forward(ids, 0, 1.0)  # every token through pyeffort.matmul at effort 1.0
    assert all(lin.w16 is None for lin in m.linears())
    for lin in m.linears():
        lin.prefill_dense = True
    np.testing.assert_allclose(a, m.forward(ids, 0, 1.0), rtol=0, atol=1e-3 * np.abs(a).max())


def test_sliding_window_changes_late_positions(tiny, tmp_path):
    write_tiny_mistral(tmp_path / "nowin", window=None)
    free = from_source(tmp_path / "nowin")
    win = from_source(tiny)
    ids = prompt_ids(win)
    a, b = win.forward(ids, 0, 1.0), free.forward(ids, 0, 1.0)
    np.testing.assert_allclose(a[:WINDOW], b[:WINDOW], rtol=0, atol=1e-4)
    assert np.abs(a[WINDOW + 1 :] - b[WINDOW + 1 :]).max() > 1e-2


def test_effort_is_realised_and_changes_per_token(tiny_model):
    ids = prompt_ids(tiny_model)
    asked = iter([1.0, 0.5, 0.3, 0.5, 0.3, 0.5, 0.3, 0.5, 0.3])
    st = Stats()
    out = list(
        generate(tiny_model, ids, max_tokens=9, effort=lambda: next(asked), stop=[], stats=st)
    )
    assert len(out) == 9 and st.efforts == [1.0, 0.5, 0.3, 0.5, 0.3, 0.5, 0.3, 0.5]
    assert abs(st.realised - np.mean(st.efforts)) < 0.02
    lin = next(tiny_model.linears())
    assert lin.total > 0


def test_lm_head_dense_unless_asked(tiny):
    m = from_source(tiny)
    ids = prompt_ids(m, 6)
    dense = m.forward(ids, 0, 0.3)
    m.effort_head(True)
    np.testing.assert_allclose(m.forward(ids, 0, 1.0), load(tiny).forward(ids, 0, 1.0), atol=1e-4)
    m.head.reset_counters()
    low = m.forward(ids, 0, 0.3)
    assert m.head.mults < 0.35 * m.head.total and not np.allclose(low, dense)


def test_hook_replaces_every_linear(tiny_model):
    ids = prompt_ids(tiny_model, 5)
    seen = []

    def hook(lin, x, effort):
        seen.append(lin.name)
        return x @ lin.dense().astype(np.float32)

    for lin in tiny_model.linears():
        lin.hook = hook
    try:
        hooked = tiny_model.forward(ids, 0, 0.5)
    finally:
        for lin in tiny_model.linears():
            lin.hook = None
    assert len(seen) == 14
    np.testing.assert_allclose(hooked, tiny_model.forward(ids, 0, 1.0), atol=1e-3)


def test_decode_takes_any_hook_output(tiny_model):
    """A hook may return float64 or a non-contiguous array: one-token decoding (the backend's
    norm, rope and attention calls) takes it as the batched path does."""
    ids = prompt_ids(tiny_model, 6)

    def hook(lin, x, effort):  # float64, in Fortran order
        return np.asfortranarray(x.astype(np.float64) @ lin.dense().astype(np.float64))

    want = tiny_model.forward(ids, 0, 1.0)[-1]
    tiny_model.forward(ids[:-1], 0, 1.0)
    for lin in tiny_model.linears():
        lin.hook = hook
    try:
        got = tiny_model.forward(ids[-1:], len(ids) - 1, 1.0)[0]
    finally:
        for lin in tiny_model.linears():
            lin.hook = None
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_convert_roundtrip_and_partial_load(tiny, tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        dst = conv.convert(tiny, tmp_path / "conv", progress=False)
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in dst.iterdir() if p.suffix == ".safetensors"} == {
        0o644
    }
    m = load(dst)
    ids = prompt_ids(m)
    np.testing.assert_array_equal(m.forward(ids, 0, 1.0), tiny_model.forward(ids, 0, 1.0))
    assert m.tokenizer.encode("the dog") == tiny_model.tokenizer.encode("the dog")
    m70 = load(dst, fraction=0.7)
    full = sum(lin.buckets.nbytes for lin in m.linears())
    part = sum(lin.buckets.nbytes for lin in m70.linears())
    assert abs(part / full - 0.7) < 0.02
    for lin in m70.linears():
        assert isinstance(lin.buckets.values, np.memmap)  # only the kept prefix is mapped
        assert abs(lin.buckets.loaded_fraction - 0.7) < 0.02
    assert np.isfinite(m70.forward(ids, 0, 0.5)).all()
    with pytest.raises(FileExistsError):
        conv.convert(tiny, dst, progress=False)


def test_convert_streams_layer_by_layer(tmp_path):
    import tracemalloc

    write_tiny_mistral(tmp_path / "deep", n_layers=24)
    src = tmp_path / "deep"
    tracemalloc.start()
    try:
        conv.convert(src, tmp_path / "conv", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    m = load(tmp_path / "conv")
    model = sum(lin.buckets.nbytes + 32 * lin.shape[0] * 4 for lin in m.linears())
    # a converter holding every layer would peak above the model's size; ours holds one layer
    # (1/24 of it) plus about 1 MB of fixed overhead (tokenizer, tqdm, headers)
    assert peak < 0.4 * model, (peak, model)


def test_interrupted_convert_leaves_nothing(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pyeffort.build_buckets

    def failing(w, *out_weight, **values):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second layer
            raise KeyboardInterrupt
        return real(w, *out_weight, **values)

    monkeypatch.setattr(pyeffort, "build_buckets", failing)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(tiny, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_converted_format_is_checked(tiny, tmp_path):
    dst = conv.convert(tiny, tmp_path / "conv", progress=False)
    man = json.loads((dst / conv.MANIFEST).read_text())
    assert man["version"] == 2 and man["kind"] == "model" and man["format"] == "pyeffort"
    assert man["values"] == "f16"
    man["version"] = 99
    (dst / conv.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(pyeffort.FormatError, match="version"):
        load(dst)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load(tmp_path)


# ------------------------------------------------------------ against transformers


def test_logits_match_transformers(tiny, tiny_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    hf.eval()
    ids = prompt_ids(tiny_model)  # 20 tokens > window 8
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    tol = REL_TOL * np.abs(ref).max()
    np.testing.assert_allclose(tiny_model.forward(ids, 0, 1.0), ref, rtol=0, atol=tol)
    tiny_model.reset()
    steps = np.array([tiny_model.forward([t], i, 1.0)[0] for i, t in enumerate(ids)])
    np.testing.assert_allclose(steps, ref, rtol=0, atol=tol)
    # greedy decoding: the same tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          min_new_tokens=16, pad_token_id=0)  # fmt: skip
    ours = list(generate(tiny_model, ids, max_tokens=16, stop=[]))
    assert ours == out[0, len(ids) :].tolist()


def test_tied_llama_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_tiny_mistral(tmp_path, llama=True, seed=3)
    ours = from_source(tmp_path)
    assert ours.args.tie_embeddings and ours.args.architecture == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = prompt_ids(ours)
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([ids])).logits[0].numpy()
    tol = REL_TOL * np.abs(ref).max()
    np.testing.assert_allclose(ours.forward(ids, 0, 1.0), ref, rtol=0, atol=tol)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "the cat sat on the mat"
    assert ours.tokenizer.kind == "tokenizers" and ours.tokenizer.add_bos
    assert ours.tokenizer.encode(text) == tok(text)["input_ids"]
    assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text


def test_tokenizer_matches_transformers(tiny, tiny_model):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model with it
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny))
    text = "the cat sat on the mat"
    assert tiny_model.tokenizer.encode(text) == ref(text)["input_ids"]


# ------------------------------------------------------------ GGUF (llama.cpp layout)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the loader must undo it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(hf_folder, path, extra=None) -> None:
    """The HF folder's weights and SentencePiece tokenizer as a llama GGUF file (F32 tensors);
    ``extra(writer)`` may add metadata or tensors."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece as spm

    from pyeffort.models.loaders.hf import HFSource

    cfg = json.loads((hf_folder / "config.json").read_text())
    src = HFSource(hf_folder)
    sp = spm.SentencePieceProcessor(model_file=str(hf_folder / "tokenizer.model"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([float(sp.get_score(i)) for i in range(n)])
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
             for i in range(n)]  # fmt: skip
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
             "ffn.w1": "ffn_gate", "ffn.w3": "ffn_up", "ffn.w2": "ffn_down",
             "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}  # fmt: skip
    w.add_tensor("token_embd.weight", src.get("embed"))
    w.add_tensor("output_norm.weight", src.get("norm"))
    w.add_tensor("output.weight", np.ascontiguousarray(src.get("lm_head").T))
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            if ours.startswith("ffn.") and src.args.n_experts:  # a MoE: ``extra`` stacks them
                continue
            a = src.get(f"layers.{i}.{ours}")
            a = np.ascontiguousarray(a.T) if a.ndim == 2 else a  # GGUF keeps (n_out, n_in)
            if ours == "attn.wq":
                a = _permute(a, cfg["num_attention_heads"])
            elif ours == "attn.wk":
                a = _permute(a, cfg["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(a, dtype=np.float32))
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loader_undoes_the_permutation(tmp_path):
    write_tiny_mistral(tmp_path / "hf", window=None, seed=5)
    write_gguf(tmp_path / "hf", tmp_path / "tiny.gguf")
    hf, gg = from_source(tmp_path / "hf"), from_source(tmp_path / "tiny.gguf")
    assert gg.args.n_kv_heads == 2 and not gg.args.tie_embeddings
    ids = prompt_ids(hf)
    np.testing.assert_allclose(gg.forward(ids, 0, 1.0), hf.forward(ids, 0, 1.0), rtol=0, atol=1e-5)
    for text in ("the cat sat on the mat", "  blue sky  red  river stone", "a\n,b"):
        assert gg.tokenizer.encode(text) == hf.tokenizer.encode(text)
        if "\n" in text:  # unknown characters: sentencepiece writes " ⁇ ", tokenizers "<unk>"
            continue
        assert gg.tokenizer.decode(gg.tokenizer.encode(text)) == hf.tokenizer.decode(
            hf.tokenizer.encode(text)
        )


def test_grouped_decode_equals_one_matrix_at_a_time(tiny_model, monkeypatch):
    """q/k/v and gate/up go through pyeffort.matmul_group in decode: the same tokens, logits
    and counted multiplications as one call per matrix."""
    from pyeffort.models import llama

    ids = prompt_ids(tiny_model)

    def run():
        tiny_model.reset_counters()
        logits = [tiny_model.forward(ids, 0, 0.4)[-1]]
        for i in range(4):
            logits.append(tiny_model.forward(np.array([i + 3]), len(ids) + i, 0.4)[0])
        return np.stack(logits), tiny_model.realised_effort()

    grouped = run()
    monkeypatch.setattr(llama, "call_group", lambda lins, x, e: [lin(x, e) for lin in lins])
    single = run()
    assert np.array_equal(grouped[0], single[0]) and grouped[1] == single[1]
