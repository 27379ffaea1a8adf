"""A tiny random Mixtral (4 experts, top-2, GQA; sliding window off and on) saved as a sharded
Hugging Face folder the way transformers saves MixtralForCausalLM (experts one by one), and as a
GGUF the way llama.cpp writes it (experts stacked): routing and logits against transformers,
prefill and KV-cache decode, converter and partial loads, and the realised effort counted over
the routed experts only.

Tolerance against transformers as in test_model_hf: weights rounded to float16 before they are
saved, max |logit difference| <= REL_TOL * max |logit| at effort 1.0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_model_hf import REL_TOL, WINDOW, _train_spm, prompt_ids, write_gguf

import pyeffort
from pyeffort.models import convert as conv
from pyeffort.models import from_source, load, moe
from pyeffort.models.args import ConfigError
from pyeffort.models.generate import Stats, generate
from pyeffort.models.loaders import open_source

D, H, N_HEADS, N_KV, HD = 64, 96, 4, 2, 16
N_EXPERTS, TOP_K = 4, 2


def write_tiny_mixtral(folder, window: int | None = None, seed: int = 0, n_layers: int = 2) -> dict:
    """A random MixtralForCausalLM checkpoint folder in two shards and an index; -> its config."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(_train_spm())
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    cfg = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": D,
        "intermediate_size": H, "num_hidden_layers": n_layers, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV, "head_dim": HD, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "sliding_window": window, "max_position_embeddings": 256,
        "num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "router_aux_loss_coef": 0.02,
        "output_router_logits": False, "router_jitter_noise": 0.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):  # float16-representable float32
        s = scale if scale is not None else 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float16).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, D, scale=1.0), "lm_head.weight": w(vocab, D)}
    t["model.norm.weight"] = norm()
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(N_HEADS * HD, D)
        t[p + "self_attn.k_proj.weight"] = w(N_KV * HD, D)
        t[p + "self_attn.v_proj.weight"] = w(N_KV * HD, D)
        t[p + "self_attn.o_proj.weight"] = w(D, N_HEADS * HD)
        t[p + "block_sparse_moe.gate.weight"] = w(N_EXPERTS, D, scale=1.0)
        for e in range(N_EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"], t[q + "w3.weight"], t[q + "w2.weight"] = w(H, D), w(H, D), w(D, H)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = norm(), norm()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    index = {"metadata": {}, "weight_map": {}}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return cfg


def stacked_experts(hf_folder, qtype=None):
    """``write_gguf``'s ``extra``: the experts as llama.cpp writes Mixtral (metadata, router
    ``ffn_gate_inp`` (n_expert, dim), stacks ``ffn_{gate,up,down}_exps`` (n_expert, n_out, n_in)),
    F32 or quantised to ``qtype``."""
    import gguf

    from pyeffort.models.loaders.hf import HFSource

    src = HFSource(hf_folder)

    def add(w):
        w.add_uint32("llama.expert_count", N_EXPERTS)
        w.add_uint32("llama.expert_used_count", TOP_K)
        for i in range(src.args.n_layers):
            router = src.get(f"layers.{i}.router").T  # (n_expert, dim)
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.ascontiguousarray(router))
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                name = f"blk.{i}.ffn_{theirs}_exps.weight"
                a = np.stack([src.get(f"layers.{i}.ffn.experts.{e}.{ours}").T
                              for e in range(N_EXPERTS)])  # fmt: skip
                if qtype is None:
                    w.add_tensor(name, np.ascontiguousarray(a))
                else:
                    q = gguf.quants.quantize(a, qtype)
                    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    return add


@pytest.fixture(scope="module", params=[None, WINDOW], ids=["no-window", "window"])
def tiny(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    write_tiny_mixtral(folder, window=request.param)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return from_source(tiny)


@pytest.fixture(scope="module")
def reference(tiny, tiny_model):
    """transformers' logits of the prompt and its greedy continuation (16 tokens)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = prompt_ids(tiny_model)  # 20 tokens > window 8
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].numpy()
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=0)  # fmt: skip
    return ids, logits, out[0, len(ids) :].tolist()


def _close(got, ref) -> bool:
    return float(np.abs(got - ref).max()) <= REL_TOL * float(np.abs(ref).max())


def test_loader_reads_mixtral(tiny, tiny_model):
    a = tiny_model.args
    assert (a.architecture, a.n_experts, a.n_experts_per_tok, a.n_kv_heads) == ("mixtral", 4, 2, 2)
    names = [lin.name for lin in tiny_model.linears()]
    assert len(names) == 2 * (4 + 3 * N_EXPERTS)
    assert names[4:7] == [f"layers.0.ffn.experts.0.{n}" for n in ("w1", "w3", "w2")]
    assert tiny_model.layers[0].ffn.router.shape == (D, N_EXPERTS)


def test_logits_and_greedy_match_transformers(tiny_model, reference):
    ids, ref, greedy = reference
    assert _close(tiny_model.forward(ids, 0, 1.0), ref)  # prefill
    tiny_model.reset()
    steps = np.array([tiny_model.forward([t], i, 1.0)[0] for i, t in enumerate(ids)])
    assert _close(steps, ref)  # KV-cache decode, token by token
    assert list(generate(tiny_model, ids, max_tokens=16, stop=[])) == greedy


def _top1(route, logits, k):
    return route(logits, 1)


def _unnormalised(route, logits, k):
    idx, _ = route(logits, k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return idx, np.take_along_axis(p / p.sum(-1, keepdims=True), idx, -1).astype(np.float32)


@pytest.mark.parametrize("wrong", [_top1, _unnormalised], ids=["top-1", "not-renormalised"])
def test_wrong_routing_is_caught(tiny_model, reference, monkeypatch, wrong):
    """The comparison above can fail: routed top-1, or with the top-k probabilities not
    renormalised, the logits leave the tolerance."""
    ids, ref, _ = reference
    real = moe.route
    monkeypatch.setattr(moe, "route", lambda logits, k: wrong(real, logits, k))
    assert not _close(tiny_model.forward(ids, 0, 1.0), ref)


def test_route_renormalises_the_top_k():
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]], np.float32)
    idx, w = moe.route(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]  # ties: the lower expert first
    np.testing.assert_allclose(w[0], [np.e / (np.e + 1), 1 / (np.e + 1)], rtol=1e-6)
    np.testing.assert_allclose(w[1], [0.5, 0.5])


def test_unrouted_experts_cost_nothing(tiny_model, monkeypatch):
    """A decoding step multiplies through (and so reads) the attention matrices and the k routed
    experts of each layer only; the realised effort counts those products alone."""
    ids = prompt_ids(tiny_model)
    tiny_model.forward(ids[:-1], 0, 1.0)
    touched, nbytes = set(), []
    real_group, real_one = pyeffort.matmul_group, pyeffort.matmul

    def spy_group(x, Ws, effort=1.0, **kw):
        touched.update(id(b) for b in Ws)
        ys, infos = real_group(x, Ws, effort, **kw)
        nbytes.extend(i.bytes_read for i in infos)
        return ys, infos

    def spy_one(x, W, effort=1.0, **kw):
        touched.add(id(W))
        y, info = real_one(x, W, effort, **kw)
        nbytes.append(info.bytes_read)
        return y, info

    monkeypatch.setattr(pyeffort, "matmul_group", spy_group)
    monkeypatch.setattr(pyeffort, "matmul", spy_one)
    tiny_model.reset_counters()
    tiny_model.forward(ids[-1:], len(ids) - 1, 0.5)
    for b in tiny_model.layers:
        used = [f for f in b.ffn.experts if f.w1.total]
        assert len(used) == TOP_K
        for f in b.ffn.experts:
            for lin in f.linears():
                assert (id(lin.buckets) in touched) == (f in used)
                assert lin.total == (lin.shape[0] * lin.shape[1] if f in used else 0)
    counted = [lin for lin in tiny_model.linears() if lin.total]
    assert len(counted) == 2 * (4 + 3 * TOP_K) and len(nbytes) == len(counted)
    done = sum(lin.mults for lin in counted)
    routed = sum(lin.shape[0] * lin.shape[1] for lin in counted)
    assert tiny_model.realised_effort() == done / routed
    assert abs(done / routed - 0.5) < 0.02
    routed_bytes = sum(lin.buckets.nbytes for lin in counted)  # < those of all the matrices
    assert 0 < sum(nbytes) <= 0.55 * routed_bytes


def test_effort_realised_over_generation(tiny_model):
    ids = prompt_ids(tiny_model)
    st = Stats()
    out = list(generate(tiny_model, ids, max_tokens=8, effort=0.4, stop=[], stats=st))
    assert len(out) == 8 and abs(st.realised - 0.4) < 0.02


def test_gguf_with_stacked_experts(tmp_path):
    write_tiny_mixtral(tmp_path / "hf", window=None, seed=5)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", stacked_experts(tmp_path / "hf"))
    hf, gg = from_source(tmp_path / "hf"), from_source(tmp_path / "m.gguf")
    assert (gg.args.n_experts, gg.args.n_experts_per_tok, gg.args.architecture) == (4, 2, "mixtral")
    ids = prompt_ids(hf)
    np.testing.assert_array_equal(gg.forward(ids, 0, 1.0), hf.forward(ids, 0, 1.0))


def test_gguf_quantised_stack_reads_one_expert(tmp_path):
    gguf = pytest.importorskip("gguf")
    q8 = gguf.GGMLQuantizationType.Q8_0
    write_tiny_mixtral(tmp_path / "hf", seed=6, n_layers=1)
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", stacked_experts(tmp_path / "hf", q8))
    src = open_source(tmp_path / "m.gguf")
    t = src.tensors["layers.0.ffn.experts.w2"]
    whole = gguf.quants.dequantize(t.data, q8)  # (n_expert, dim, hidden)
    for e in range(N_EXPERTS):
        np.testing.assert_array_equal(src.get(f"layers.0.ffn.experts.{e}.w2"), whole[e].T)


def test_gguf_experts_without_their_metadata_are_refused(tmp_path):
    write_tiny_mixtral(tmp_path / "hf", seed=5, n_layers=1)

    def stacks_only(w):
        add = stacked_experts(tmp_path / "hf")
        w.add_uint32 = lambda key, v: None  # drop expert_count / expert_used_count
        add(w)

    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", stacks_only)
    with pytest.raises(ConfigError, match="expert_count"):
        open_source(tmp_path / "m.gguf")


def test_bad_expert_counts_are_refused(tmp_path):
    cfg = write_tiny_mixtral(tmp_path, n_layers=1)
    for k, n in ((3, 2), (0, 4)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": k,
                                                          "num_local_experts": n}))  # fmt: skip
        with pytest.raises(ConfigError, match="n_experts"):
            from_source(tmp_path)


def test_convert_roundtrip_and_partial_load(tiny, tiny_model, tmp_path):
    dst = conv.convert(tiny, tmp_path / "conv", progress=False)
    m = load(dst)
    ids = prompt_ids(m)
    np.testing.assert_array_equal(m.forward(ids, 0, 1.0), tiny_model.forward(ids, 0, 1.0))
    half = load(dst, fraction=0.5)
    full = sum(lin.buckets.nbytes for lin in m.linears())
    assert abs(sum(lin.buckets.nbytes for lin in half.linears()) / full - 0.5) < 0.02
    for lin in half.linears():  # every expert too: only the kept prefix of its rows is mapped
        assert isinstance(lin.buckets.values, np.memmap)
        assert abs(lin.buckets.loaded_fraction - 0.5) < 0.02
        assert lin.buckets.values.shape[0] < 0.52 * 16 * lin.shape[0]
    out = half.forward(ids, 0, 0.5)
    assert np.isfinite(out).all() and not np.allclose(out, m.forward(ids, 0, 0.5))


def test_convert_peak_memory_is_about_one_layer(tmp_path):
    import tracemalloc

    write_tiny_mixtral(tmp_path / "deep", n_layers=16)
    tracemalloc.start()
    try:
        conv.convert(tmp_path / "deep", tmp_path / "conv", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    m = load(tmp_path / "conv")
    model = sum(lin.buckets.nbytes + 32 * lin.shape[0] * 4 for lin in m.linears())
    # a converter holding every layer would peak above the model's size; ours holds one layer
    # (1/16 of it, its experts read one by one) plus about 1 MB of fixed overhead
    assert peak < 0.3 * model, (peak, model)


def test_checkpoint_saved_by_transformers(tiny, tiny_model, tmp_path):
    """MixtralForCausalLM.save_pretrained's own folder (sharded) loads to the same model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path), max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tiny / f).read_bytes())
    m = from_source(tmp_path)
    ids = prompt_ids(m)
    np.testing.assert_array_equal(m.forward(ids, 0, 1.0), tiny_model.forward(ids, 0, 1.0))


# ---------------------------------------------------------------- the torch forward (llama_torch)


@pytest.fixture
def torch_one_thread():
    """torch (imported here: the tests above run without it), one OpenMP thread (test_model_torch)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)


@pytest.mark.parametrize("effort", [1.0, 0.5])
def test_torch_model_matches_the_numpy_model(tiny_model, torch_one_thread, effort):
    """The torch forward on the CPU (the numpy model's EffortLinears, routing in torch): prefill,
    KV-cache decode past the window and a growing cache, greedy tokens, and the realised effort
    over the routed experts, as the numpy model."""
    from test_model_torch import assert_close, decode_steps

    from pyeffort.models.llama_torch import TorchModel

    ids = prompt_ids(tiny_model)
    twin = TorchModel(tiny_model, "cpu", capacity=8)
    assert_close(decode_steps(twin, ids, effort), decode_steps(tiny_model, ids, effort))
    assert twin.net.capacity == 32
    assert_close(twin.forward(ids, 0, effort), tiny_model.forward(ids, 0, effort))
    st = [Stats(), Stats()]
    ref = list(generate(tiny_model, ids, max_tokens=12, effort=effort, stop=[], stats=st[0]))
    assert list(generate(twin, ids, max_tokens=12, effort=effort, stop=[], stats=st[1])) == ref
    assert abs(st[0].realised - st[1].realised) < 1e-4 and abs(st[1].realised - effort) < 0.02


def test_torch_wrong_routing_is_caught(tiny_model, torch_one_thread, monkeypatch):
    """The comparison above can fail: the torch block routed top-1 leaves the tolerance."""
    from test_model_torch import REL_TOL

    from pyeffort.models import llama_torch

    real = llama_torch.route
    monkeypatch.setattr(llama_torch, "route", lambda logits, k: real(logits, 1))
    ids = prompt_ids(tiny_model)
    got = llama_torch.TorchModel(tiny_model, "cpu").forward(ids, 0, 1.0)
    ref = tiny_model.forward(ids, 0, 1.0)
    assert np.abs(got - ref).max() > 100 * REL_TOL * np.abs(ref).max()


def test_torch_route_is_moe_route(torch_one_thread):
    torch = torch_one_thread
    from pyeffort.models.llama_torch import route

    logits = np.random.default_rng(3).standard_normal((50, N_EXPERTS)).astype(np.float32)
    logits[0] = [1.0, 2.0, 2.0, 0.0]  # a tie: the lower expert first
    for k in (1, TOP_K, N_EXPERTS):
        idx, w = route(torch.from_numpy(logits), k)
        want_idx, want_w = moe.route(logits, k)
        np.testing.assert_array_equal(idx.numpy(), want_idx)
        np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-6)


def test_cuda_matmuls_call_and_count_the_routed_experts(tiny_model, torch_one_thread, monkeypatch):
    """CudaMatmuls on test_model_torch's host stand-in of pyeffort.cuda: the numpy model's
    logits; a decoded token calls q/k/v and the k routed experts' gate/up in groups, and the
    realised effort's denominator is the numpy model's (the routed experts' products only)."""
    import sys

    from test_model_torch import assert_close, decode_steps, host_cuda_stand_in

    from pyeffort.models import llama_torch

    torch = torch_one_thread
    fake = host_cuda_stand_in()
    monkeypatch.setitem(sys.modules, "pyeffort.cuda", fake)
    monkeypatch.setattr(pyeffort, "cuda", fake, raising=False)
    mm = llama_torch.CudaMatmuls(tiny_model, "cpu", torch.float32)
    monkeypatch.setattr(mm, "info", list)  # the kernels' counters: none on the stand-in
    twin = llama_torch.TorchModel(tiny_model, "cpu", matmuls=mm)
    ids = prompt_ids(tiny_model)
    tiny_model.reset_counters()
    assert_close(decode_steps(twin, ids, 0.5), decode_steps(tiny_model, ids, 0.5))
    routed = sum(lin.total for lin in tiny_model.linears())
    assert mm.dense == 2 * (2 * D * N_HEADS * HD + 2 * D * N_KV * HD)  # attention only
    assert mm.tokens * mm.dense + mm.expert_mults == routed
    fake.calls.clear()
    twin.forward(ids[:1], len(ids), 0.5)  # one more token: q/k/v, then k experts' gate/up
    assert fake.calls == ([3] + [2] * TOP_K) * 2


def test_cuda_graphs_refuse_a_mixture_of_experts(tiny_model, torch_one_thread):
    """The routing is read back per layer: a graph would replay the captured experts."""
    from pyeffort.errors import BackendError
    from pyeffort.models.cuda_graph import GraphDecoder
    from pyeffort.models.llama_torch import TorchModel

    with pytest.raises(BackendError, match="eagerly"):
        GraphDecoder(TorchModel(tiny_model, "cpu").net)
