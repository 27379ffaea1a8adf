"""The torch forward pass (pyeffort.models.llama_torch) on torch CPU tensors against the numpy
model it is built from: the same weights, RoPE tables and effort matmuls (pyeffort.matmul on
numpy views of the torch tensors), so only the order of float32 sums differs.

Tolerance: max |logit difference| <= 1e-4 * max |logit| on the tiny models, at effort 1.0 and
0.5, and greedy tokens identical. On the default model (30 layers) at effort 0.5 a float32
rounding difference flips near-tied rows of some cutoffs and the logits move by up to ~15% of
their range — as much as the numpy model moves between its own two backends
(test_default_model_twin) — so there the bound is that spread, and the greedy tokens are
identical.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyeffort
from pyeffort import _backend
from pyeffort.errors import BackendError
from pyeffort.models import Model, ModelArgs
from pyeffort.models.generate import Stats, generate

torch = pytest.importorskip("torch")
from pyeffort.models.llama_torch import TorchModel

REL_TOL = 1e-4
PROMPT = [3, 17, 5, 90, 41, 8, 8, 23, 64, 2, 77, 31, 12, 50, 9, 99, 1, 44, 60, 7]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch's OpenMP threads spin against pyeffort's thread pool on small machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_weights(args: ModelArgs, values: str = "f16", seed: int = 0) -> dict:
    """A weights mapping as the loaders give it (matrices as Buckets of ``values``)."""
    rng = np.random.default_rng(seed)
    d, hd, h = args.dim, args.head_dim, args.hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    shapes = {"attn.wq": (d, q), "attn.wk": (d, kv), "attn.wv": (d, kv), "attn.wo": (q, d),
              "ffn.w1": (d, h), "ffn.w3": (d, h), "ffn.w2": (h, d)}  # fmt: skip
    w = {"embed": rng.standard_normal((args.vocab_size, d)).astype(np.float16),
         "norm": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}  # fmt: skip
    if not args.tie_embeddings:
        w["lm_head"] = (rng.standard_normal((d, args.vocab_size)) / np.sqrt(d)).astype(np.float16)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        for name, (n_in, n_out) in shapes.items():
            m = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float16)
            w[p + name] = pyeffort.build_buckets(m, values=values)
        for name in ("attn_norm", "ffn_norm"):
            w[p + name] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    return w


def tiny_args(**kw) -> ModelArgs:
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96,
            "vocab_size": 101, "max_seq_len": 256}  # fmt: skip
    return ModelArgs(**(base | kw))


def tiny_model(values="f16", seed: int = 0, **kw) -> Model:
    args = tiny_args(**kw)
    return Model(args, random_weights(args, values, seed))


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = REL_TOL) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b).max())


def decode_steps(m, ids, effort) -> np.ndarray:
    """Logits of each position, the first 5 tokens as a prefill and the rest one by one."""
    out = [m.forward(ids[:5], 0, effort)]
    out += [m.forward([t], 5 + i, effort) for i, t in enumerate(ids[5:])]
    return np.concatenate(out)


def assert_same_greedy(ours, peer, ids, effort, n: int, rel: float = REL_TOL) -> int:
    """Greedy decoding of ``ours`` agrees with ``peer``'s wherever the choice is not a near-tie:
    peer generates n tokens; both are then run token by token along that text, and at every step
    where peer's two best logits differ by more than 2 * rel * max |logit| (more than the two
    float pipelines may move them apart) ours must pick peer's token. Free-running equality is
    too strict below effort 1.0: a near-tie flipped by float order changes every later token.
    Returns the number of near-ties passed over (the caller bounds it)."""
    seq = list(generate(peer, ids, max_tokens=n, effort=effort, stop=[]))

    def steps(m) -> np.ndarray:  # as generate: the prompt at effort 1.0, then token by token
        out = [m.forward(ids, 0, 1.0, last_only=True)[-1:]]
        out += [m.forward([t], len(ids) + i, effort)[-1:] for i, t in enumerate(seq[:-1])]
        return np.concatenate(out)

    a, b = steps(ours), steps(peer)
    ties = 0
    for j, tok in enumerate(seq):
        best = np.sort(b[j])[-2:]
        assert int(b[j].argmax()) == tok  # peer's own greedy choice
        if best[1] - best[0] <= 2 * rel * np.abs(b[j]).max():
            ties += 1
            continue
        assert int(a[j].argmax()) == tok, (j, best, a[j].max())
    return ties


CASES = {
    "mistral-window": {"sliding_window": 6},
    "llama-tied": {"tie_embeddings": True},
    "q8-gqa4": {"values": "q8", "n_kv_heads": 1},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("effort", [1.0, 0.5])
def test_twin_matches_numpy_model(case, effort):
    """Prefill, decode past the sliding window and a growing KV cache (capacity 8 -> 32):
    the same logits and the same greedy tokens."""
    m = tiny_model(**CASES[case])
    twin = TorchModel(m, "cpu", capacity=8)
    assert_close(decode_steps(twin, PROMPT, effort), decode_steps(m, PROMPT, effort))
    assert twin.net.capacity == 32  # grown twice while decoding, the cache kept
    assert_close(twin.forward(PROMPT, 0, effort), m.forward(PROMPT, 0, effort))
    ours = list(generate(twin, PROMPT, max_tokens=12, effort=effort, stop=[]))
    assert ours == list(generate(m, PROMPT, max_tokens=12, effort=effort, stop=[]))
    assert assert_same_greedy(twin, m, PROMPT, effort, 12) <= 2


def test_same_greedy_fails_on_another_model():
    """assert_same_greedy (the GPU tests' check below effort 1.0) can fail: another model's
    choices differ where the peer's are clear."""
    m, other = tiny_model(), tiny_model(seed=1)
    with pytest.raises(AssertionError):
        assert_same_greedy(TorchModel(other, "cpu"), m, PROMPT, 0.5, 12)


def test_effort_changes_per_token_and_is_counted():
    m = tiny_model()
    twin = TorchModel(m, "cpu")
    asked = [1.0, 0.5, 0.3, 0.5, 0.3, 0.7]
    runs = []
    for model in (m, twin):
        st, it = Stats(), iter(asked)
        toks = list(generate(model, PROMPT, max_tokens=7, effort=lambda it=it: next(it),
                             stop=[], stats=st))  # fmt: skip
        runs.append((toks, st.realised))
    assert runs[0] == runs[1]
    assert abs(runs[1][1] - np.mean(asked)) < 0.02


def test_biases_are_added_to_q_k_v():
    """``layers.{i}.attn.bq/bk/bv`` (Qwen2): against the numpy model with each bias added by a
    hook on its matrix."""
    m = tiny_model()
    rng = np.random.default_rng(1)
    biases = {}
    for i, blk in enumerate(m.layers):
        for name, lin in (("bq", blk.attn.wq), ("bk", blk.attn.wk), ("bv", blk.attn.wv)):
            b = rng.standard_normal(lin.shape[1]).astype(np.float32)
            biases[f"layers.{i}.attn.{name}"] = b
            lin.hook = lambda lin, x, e, b=b: pyeffort.matmul(x, lin.buckets, e) + b
    ref = m.forward(PROMPT, 0, 1.0)
    for lin in m.linears():
        lin.hook = None
    plain = TorchModel(m, "cpu").forward(PROMPT, 0, 1.0)
    assert np.abs(plain - ref).max() > 0.1 * np.abs(ref).max()  # the biases matter here
    assert_close(TorchModel(m, "cpu", biases=biases).forward(PROMPT, 0, 1.0), ref)


def test_effort_head():
    m = tiny_model()
    m.effort_head(True)
    twin = TorchModel(m, "cpu")
    for e in (1.0, 0.3):
        assert_close(twin.forward(PROMPT, 0, e), m.forward(PROMPT, 0, e))


def test_start_pos_and_inputs_are_checked():
    m = tiny_model()
    twin = TorchModel(m, "cpu")
    full = twin.forward(PROMPT, 0, 1.0)
    np.testing.assert_array_equal(twin.forward(PROMPT, 0, 1.0), full)  # start_pos 0: afresh
    with pytest.raises(ValueError, match="start_pos"):
        twin.forward([1], len(PROMPT) + 1, 1.0)
    with pytest.raises(ValueError, match="token ids"):
        twin.forward([101], 0, 1.0)
    with pytest.raises(ValueError, match="at least one token"):
        twin.forward([], 0, 1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        twin.forward([1] * 257, 0, 1.0)
    with pytest.raises(ValueError, match="effort"):
        twin.forward([1], 0, 1.5)


def test_devices_are_checked():
    m = tiny_model()
    with pytest.raises(BackendError, match="metal"):
        TorchModel(m, "metal")
    with pytest.raises(BackendError, match="float32"):
        TorchModel(m, "cpu", dtype=torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            TorchModel(m, "cuda")


@pytest.mark.slow
def test_default_model_twin():
    """The default model (its budget profile applied): 1.0 within REL_TOL, 0.5 within the spread
    of the numpy model between its two backends; greedy tokens identical at both."""
    from pyeffort.models import load

    m = load()
    assert m.profile is not None
    twin = TorchModel(m, "cpu")
    ids = m.tokenizer.encode("The capital of France is")
    assert_close(twin.forward(ids, 0, 1.0), m.forward(ids, 0, 1.0))
    previous = _backend.use("numpy")
    try:
        other = m.forward(ids, 0, 0.5)
    finally:
        _backend.current = previous
    ref = m.forward(ids, 0, 0.5)
    spread = np.abs(other - ref).max()
    assert np.abs(twin.forward(ids, 0, 0.5) - ref).max() <= 2 * spread + REL_TOL * 30
    for e in (1.0, 0.5):
        st = [Stats(), Stats()]
        a = list(generate(m, ids, max_tokens=12, effort=e, stop=[], stats=st[0]))
        assert list(generate(twin, ids, max_tokens=12, effort=e, stop=[], stats=st[1])) == a
        # activations equal to rounding: the cutoffs, so the counts, may differ by a few rows
        assert abs(st[0].realised - st[1].realised) < 1e-4


# ---------------------------------------------------------------- --device on the command line


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from test_model_hf import write_tiny_mistral

    folder = tmp_path_factory.mktemp("tiny-device")
    write_tiny_mistral(folder)
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from pyeffort.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_device_flag(tiny_hf, capsys):
    gen = ("generate", "the cat", "--model", str(tiny_hf), "--max-tokens", "4", "--no-keys")
    rc, cpu, _ = run_cli(capsys, *gen, "--device", "cpu")
    assert rc == 0 and cpu.strip()
    if not torch.cuda.is_available():  # auto: the CPU here
        assert run_cli(capsys, *gen, "--device", "auto")[:2] == (0, cpu)
        rc, _, err = run_cli(capsys, *gen, "--device", "cuda")
        assert rc == 2 and "no CUDA GPU" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, *gen, "--device", "metal")
    assert rc == 2 and "Metal runs only on macOS" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "bench", "--model", str(tiny_hf), "--device", "metal")
    assert rc == 2 and "Metal" in err
    rc, _, err = run_cli(capsys, "eval", "--tiny", "--text", __file__, "--device", "cuda")
    assert rc == 2 and "CPU only" in err
    with pytest.raises(SystemExit):
        run_cli(capsys, *gen, "--device", "tpu")


def test_device_without_torch(monkeypatch):
    """auto falls back to the CPU without importing torch; cuda says what is missing."""
    import importlib.util
    import sys

    from pyeffort.models.commands import resolve_device

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a)
    )
    assert resolve_device("auto") == "cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(BackendError, match="needs torch"):
        resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def host_cuda_stand_in():
    """pyeffort.cuda's calls as CudaMatmuls makes them, done on the host: checks their plumbing
    (matrix order, groups, a device effort per matrix) where no GPU is. ``calls``: each group
    call's size; ``grouped``: its (matrix, effort) pairs."""
    import types

    def efforts_of(e, n):  # cuda._effort's rule: one effort for all, or (n,) one per matrix
        assert torch.is_tensor(e) and e.dtype == torch.float64 and e.shape in ((1,), (n,))
        return [float(v) for v in e.expand(n)]

    def matmul(x, b, e, out_dtype=None):
        return torch.from_numpy(pyeffort.matmul(x.numpy(), b, *efforts_of(e, 1)))

    def matmul_group(x, group, e, out_dtype=None):
        efforts = efforts_of(e, len(group))
        calls.append(len(group))
        grouped.append(list(zip(group, efforts)))
        return [torch.from_numpy(pyeffort.matmul(x.numpy(), b, f)) for b, f in zip(group, efforts)]

    calls: list[int] = []
    grouped: list[list] = []
    return types.SimpleNamespace(to_device=lambda b, device, ct=None: b, CudaGroup=list,
                                 default_ct=lambda g, device: 64,
                                 CudaBuckets=type("CudaBuckets", (), {}), matmul=matmul,
                                 matmul_group=matmul_group, calls=calls, grouped=grouped)  # fmt: skip


@pytest.mark.parametrize("profile", [False, True])
def test_cuda_matmuls_plumbing(monkeypatch, profile):
    """CudaMatmuls on the host stand-in: the numpy model's logits, q/k/v and gate/up as group
    calls with and without a budget profile, each matrix at its own effort (the profile's
    split); a profile set or dropped after the model went to the GPU is followed."""
    import sys

    from pyeffort.models import llama_torch

    fake = host_cuda_stand_in()
    monkeypatch.setitem(sys.modules, "pyeffort.cuda", fake)
    monkeypatch.setattr(pyeffort, "cuda", fake, raising=False)
    m = tiny_model()
    lin_of = {id(lin.buckets): lin for lin in m.linears()}
    names = [lin.name for lin in m.linears()]
    split = {"efforts": [0.1, 1.0], "weights": {n: [1.0 + i % 3, 1.0] for i, n in enumerate(names)}}
    if profile:
        m.set_profile(split)
    mm = llama_torch.CudaMatmuls(m, "cpu", torch.float32)
    net = llama_torch.Transformer(m, mm, capacity=32, dtype=torch.float32, device="cpu")
    for p, e in ((profile, 1.0), (profile, 0.5), (not profile, 0.5)):
        m.set_profile(split if p else None)  # the last: changed after CudaMatmuls was built
        mm.set_effort(e)
        fake.calls.clear(), fake.grouped.clear()
        with torch.no_grad():
            ours = net(torch.tensor(PROMPT), torch.arange(len(PROMPT))).numpy()
        assert_close(ours, m.forward(PROMPT, 0, e))
        assert fake.calls == [3, 2] * m.args.n_layers
        got = [f for g in fake.grouped for _, f in g]
        assert got == [lin_of[id(b)].own_effort(e) for g in fake.grouped for b, _ in g]
        if p and e < 1:  # the split gives the matrices of a group other efforts
            assert any(len({f for _, f in g}) > 1 for g in fake.grouped)


def test_device_metal_puts_every_matrix_on_the_metal_backend(tiny_hf, capsys, monkeypatch):
    """--device metal where Metal can run: the model's matrices go through the Metal backend
    (here a stand-in that counts calls and runs the host kernels), the rest stays on the CPU;
    the same text as --device cpu."""
    import sys
    import types

    from pyeffort import _devices, metal

    calls = []

    class Stand:
        backend = "metal"

        def __init__(self, b):
            self.host, self.values_kind = b, b.values_kind
            self.shape, self.n_in, self.n_out = b.shape, b.n_in, b.n_out

    def matmul(x, W, effort=1.0, *, out=None, return_info=False):
        calls.append("matmul")
        return pyeffort.matmul(x, W.host, effort, out=out, return_info=return_info)

    def matmul_group(x, Ws, effort=1.0, *, return_info=False):
        calls.append("group")
        return pyeffort.matmul_group(x, [W.host for W in Ws], effort, return_info=return_info)

    fake = types.ModuleType("fake_metal")
    fake.GROUP_MAX, fake.VALUE_KINDS = _devices.GROUP_MAX, ("f16", "q8")
    fake.matmul, fake.matmul_group = matmul, matmul_group
    fake.to_device = lambda b, device, **kw: Stand(b)
    monkeypatch.setitem(sys.modules, "fake_metal", fake)
    monkeypatch.setitem(_devices.BACKENDS, "metal", "fake_metal")
    monkeypatch.setattr(metal, "require", lambda: None)
    gen = ("generate", "the cat", "--model", str(tiny_hf), "--max-tokens", "6", "--no-keys",
           "--effort", "0.5")  # fmt: skip
    rc, cpu, _ = run_cli(capsys, *gen, "--device", "cpu")
    assert rc == 0 and not calls
    rc, out, err = run_cli(capsys, *gen, "--device", "metal")
    assert rc == 0, err
    assert out == cpu and "matmul" in calls and "group" in calls
