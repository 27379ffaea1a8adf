"""Whole-model decoding on the GPU, tokens/s, each token one CUDA graph (pyeffort.models
.llama_torch + cuda_graph). Skipped without an NVIDIA GPU. Run on the GPU machine:

    python -m pytest -q -s bench/test_cuda_decode.py

- Mistral-7B shape (32 layers, dim 4096, GQA 32/8, ffn 14336, vocab 32000), random weights of
  trained-like scale, batch 1, KV cache of 1024 positions filled: the effort model (buckets
  built on the GPU, fp16 and q8 values, one kind on the GPU at a time) at effort 1.0/0.5/0.25
  against the dense fp16 decode of the same weights (``torch.nn.functional.linear``, cuBLAS),
  both the same torch module in CUDA graphs, fp16 activations. ``decode_speedups`` gives the
  numbers bench/cuda_run.py puts in its JSON.
- The default model end to end (``generate()``: prefill, graphs, sampling on the host): ours at
  1.0/0.5/0.25, our dense path (the same module over dense fp16 copies), and transformers'
  ``generate()`` on the same GPU (fp16; its default dynamic cache, and a static cache, which it
  compiles by itself; 64 tokens after two identical warm-up calls).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
F = torch.nn.functional

CTX, STEPS = 1024, 64  # filled KV cache, timed decode steps
EFFORTS = (1.0, 0.5, 0.25)
QKV_CT = 64  # one column tile for q/k/v (4096 and 1024 wide), as experiments/cuda measured


class DenseMatmuls:
    """llama_torch's Matmuls interface over dense fp16 weights (n_out, n_in) through cuBLAS."""

    def __init__(self, weights: list[torch.Tensor], head: torch.Tensor):
        self.w, self.head_w = weights, head  # in Model.linears() order; head (vocab, dim)

    def set_effort(self, effort: float) -> None:
        pass

    def group(self, idx, x):
        return [F.linear(x, self.w[i]) for i in idx]

    def head(self, x):
        return F.linear(x, self.head_w).float()

    def info(self):
        return []

    def reset_counters(self) -> None:
        pass

    def realised_effort(self) -> float:
        return 1.0


def mistral_args():
    from pyeffort.models import config

    return config("Mistral-7B-v0.1")  # sliding window 4096: longer than the cache here


def random_linears(args, gen) -> list[torch.Tensor]:
    """nn.Linear-layout fp16 weights in Model.linears() order, std ~ 1/sqrt(n_in) with
    log-normal per-input scales (as experiments/cuda/cuda_model.py)."""
    from pyeffort.models.args import tensor_shape

    out = []
    for _ in range(args.n_layers):
        for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
            n_in, n_out = tensor_shape(args, name)
            chan = torch.exp(0.5 * torch.randn(n_in, generator=gen, device="cuda"))
            w = torch.randn((n_out, n_in), generator=gen, device="cuda") * (chan / n_in**0.5)
            out.append(w.half())
    return out


def host_model(args, mats, seed: int = 0):
    """A numpy Model holding ``mats`` (CudaBuckets, or anything with their shape attributes)
    and random embedding, norms and LM head."""
    from pyeffort.models import Model

    rng = np.random.default_rng(seed)
    d = args.dim
    w = {"embed": rng.standard_normal((args.vocab_size, d)).astype(np.float16),
         "norm": np.ones(d, np.float32),
         "lm_head": (rng.standard_normal((d, args.vocab_size)) / d**0.5).astype(np.float16)}  # fmt: skip
    names = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w3", "ffn.w2")
    for i in range(args.n_layers):
        for j, n in enumerate(names):
            w[f"layers.{i}.{n}"] = mats[7 * i + j]
        w[f"layers.{i}.attn_norm"] = w[f"layers.{i}.ffn_norm"] = np.ones(d, np.float32)
    return Model(args, w)


class ShapeOnly:
    """What Model needs of a matrix it never multiplies (the dense twin's)."""

    def __init__(self, w):
        self.n_out, self.n_in = w.shape
        self.shape, self.loaded_fraction, self.nbytes = (self.n_in, self.n_out), 1.0, 0


def fill_cache(net, gen) -> None:
    for b in net.layers:
        for c in (b.attn.k_cache, b.attn.v_cache):
            c[:, :CTX] = torch.randn(c[:, :CTX].shape, generator=gen, device="cuda").to(c.dtype)


def decode_tps(net, decoder, effort: float | None) -> float:
    """Tokens/s of STEPS graph replays from position CTX (token and position set per step)."""
    if effort is not None:
        net.mm.set_effort(effort)
    for i in range(3):
        decoder(7, CTX + i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(STEPS):
        decoder(7 + i, CTX + i)
    torch.cuda.synchronize()
    return STEPS / (time.perf_counter() - t0)


def transformer(model, mm, gen):
    from pyeffort.models.cuda_graph import GraphDecoder
    from pyeffort.models.llama_torch import Transformer

    cap = CTX + STEPS + 8
    net = Transformer(model, mm, capacity=cap, dtype=torch.float16, device="cuda")
    fill_cache(net, gen)
    return net, GraphDecoder(net)


@functools.lru_cache(maxsize=1)
def mistral_weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    return random_linears(mistral_args(), gen)


@functools.lru_cache(maxsize=1)
def dense_tps() -> float:
    args, ws = mistral_args(), mistral_weights()
    model = host_model(args, [ShapeOnly(w) for w in ws])
    head = torch.from_numpy(np.ascontiguousarray(model.lm_head.T)).cuda()
    net, dec = transformer(model, DenseMatmuls(ws, head), torch.Generator("cuda").manual_seed(1))
    tps = decode_tps(net, dec, None)
    del net, dec
    torch.cuda.empty_cache()
    return tps


def decode_speedups(values: str, efforts=(0.5, 0.25)) -> dict:
    """Mistral-7B-shaped decode, ``values`` ("f16" or "q8") buckets at each effort against the
    dense fp16 decode: {"decode_speedup_eE": tokens/s over dense's, ..., "tokens_per_s": {"dense":
    ..., "effort_E": ...}, "card": the GPU's name}."""
    from pyeffort import cuda
    from pyeffort.models.llama_torch import CudaMatmuls

    dense = dense_tps()
    args, ws = mistral_args(), mistral_weights()
    mats = []
    for k, w in enumerate(ws):
        ct = QKV_CT if k % 7 < 3 else None
        mats.append(cuda.build_buckets(w.t(), values=values, ct=ct))
    model = host_model(args, mats)
    net, dec = transformer(model, CudaMatmuls(model, "cuda", torch.float16),
                           torch.Generator("cuda").manual_seed(1))  # fmt: skip
    tps = {"dense": round(dense, 2)}
    out = {"card": torch.cuda.get_device_name(), "values": values}
    for e in efforts:
        tps[f"effort_{e}"] = round(decode_tps(net, dec, e), 2)
        out[f"decode_speedup_e{e}"] = round(tps[f"effort_{e}"] / dense, 3)
    out["tokens_per_s"], out["captures"] = tps, dec.captures
    del net, dec, model, mats
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_mistral_shaped_decode(values):
    res = decode_speedups(values, EFFORTS)
    print(json.dumps(res))
    assert res["captures"] == 1  # one graph served every effort
    _save(f"mistral_{values}", res)


# ---------------------------------------------------------------- the default model end to end

PROMPT = "The history of the city began"
TOKENS = 64


def ours_tps(model, effort: float, mm=None) -> float:
    from pyeffort.models.generate import Stats, generate
    from pyeffort.models.llama_torch import TorchModel

    tm = TorchModel(model, "cuda", dtype=torch.float16, matmuls=mm)  # mm: our dense path
    ids = model.tokenizer.encode(PROMPT)
    list(generate(tm, ids, max_tokens=8, effort=effort, stop=[]))  # capture, warm-up
    st = Stats()
    list(generate(tm, ids, max_tokens=TOKENS + 1, effort=effort, stop=[], stats=st))
    return st.decode_tps


def hf_tps(cache: str) -> float:
    """transformers' greedy ``generate()`` on the GPU, fp16: ``cache`` "dynamic" (its default)
    or "static" (which transformers compiles by itself when it can). The warm-up calls take the
    timed call's arguments: a static cache of another length re-compiles inside the timing (an
    H100 run with an 8-token warm-up measured 5.3 tok/s)."""
    transformers = pytest.importorskip("transformers")
    from pyeffort.models.default import default_gguf

    gguf = default_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float16
    ).cuda()
    ids = tok(PROMPT, return_tensors="pt").input_ids.cuda()
    kw = {"do_sample": False, "pad_token_id": tok.eos_token_id}
    kw |= {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS}
    if cache == "static":
        kw["cache_implementation"] = "static"
    times = []
    for _ in range(3):  # two warm-ups (compilation), then the timed call
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return TOKENS / times[-1]


def test_default_model_end_to_end():
    from pyeffort.models import load

    try:
        model = load()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    res = {"card": torch.cuda.get_device_name()}
    for e in EFFORTS:  # its shipped budget split: group calls, each matrix at its own effort
        res[f"pyeffort_e{e}"] = round(ours_tps(model, e), 1)
    profile = model.profile
    model.set_profile(None)  # one effort for all (the same group calls)
    for e in EFFORTS:
        res[f"pyeffort_uniform_e{e}"] = round(ours_tps(model, e), 1)
    model.set_profile(profile)
    ws = [torch.from_numpy(np.ascontiguousarray(lin.dense().T)).cuda() for lin in model.linears()]
    head = torch.from_numpy(np.ascontiguousarray(model.lm_head.T)).cuda()
    res["pyeffort_dense_f16"] = round(ours_tps(model, 1.0, DenseMatmuls(ws, head)), 1)
    for cache in ("dynamic", "static"):
        key = f"transformers_{cache}"
        try:
            res[key] = round(hf_tps(cache), 1)
        except Exception as exc:  # noqa: BLE001 (torch.compile may not run there: say so)
            res[key] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    print(json.dumps(res))
    _save("default_model", res)


def _save(name: str, res: dict) -> None:
    """Adds ``res`` under ``name`` to $PYEFFORT_DECODE_JSON, when set."""
    path = os.environ.get("PYEFFORT_DECODE_JSON")
    if not path:
        return
    data = json.loads(pathlib.Path(path).read_text()) if os.path.exists(path) else {}
    data[name] = res
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
