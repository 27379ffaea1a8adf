"""The CUDA backend against the numpy reference (same selection), on random and real weights.
Skipped where there is no CUDA GPU. Every call gets fresh inputs and a NaN-poisoned output."""

import os
import pathlib
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort import reference

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
if torch.cuda.is_available():
    from pyeffort import cuda

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def reference_out(x: torch.Tensor, b: pyeffort.Buckets, effort: float):
    """x (T, n_in) CUDA -> (y (T, n_out) f64-accumulated reference, mults per token list)."""
    x32 = x.float().cpu().numpy().reshape(-1, b.n_in)
    y = np.empty((x32.shape[0], b.n_out), dtype=np.float32)
    mults = []
    for t in range(x32.shape[0]):
        m, _ = reference.bucketmul(
            x32[t : t + 1], b.values, b.positions, b.stats, b.order, b.n_out, effort, y[t : t + 1]
        )
        mults.append(m)
    return y, mults


def scale(x: torch.Tensor, b: pyeffort.Buckets, dense=None) -> np.ndarray:
    """Sum of |products| per output: the size fp32 rounding is relative to."""
    x32 = np.abs(x.float().cpu().numpy().reshape(-1, b.n_in)).astype(np.float64)
    return x32 @ (dense if dense is not None else np.abs(b.to_dense().astype(np.float64)))


def run_gpu(x, bc, effort, out_dtype=torch.float32):
    shape = (bc.n_out,) if x.ndim == 1 else (x.shape[0], bc.n_out)
    y = torch.full(shape, float("nan"), dtype=out_dtype, device=x.device)  # poison
    _, info = pyeffort.matmul(x, bc, effort, out=y, return_info=True)
    return y, info


def assert_close(y, ref, sc, rel):
    y = y.float().cpu().numpy().reshape(ref.shape)
    assert np.isfinite(y).all(), "an output was not written"
    err = np.abs(y.astype(np.float64) - ref)
    bound = rel * sc + 1e-7 * sc.max() + 1e-30
    assert (err <= bound).all(), float((err / (sc + 1e-30)).max())


def fresh_x(gen, n_tok, n_in, dtype):
    x = torch.randn((n_tok, n_in), generator=gen, device="cuda") * 2.0
    x = x * (torch.rand((n_tok, n_in), generator=gen, device="cuda") ** 4)  # heavy-ish tails
    return x.to(dtype)


@pytest.fixture
def gen(request):
    g = torch.Generator(device="cuda")
    g.manual_seed(abs(hash(request.node.nodeid)) % 2**31)
    return g


SHAPES = [(100, 37), (257, 300), (1000, 1000), (4096, 1024), (96, 4100), (5000, 300), (300, 7)]


@pytest.mark.parametrize("shape", SHAPES)  # 5000 inputs: the separate candidate kernel
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_matches_reference_random(shape, dtype, gen, rng):
    w = (rng.standard_normal(shape) * rng.lognormal(0, 0.7, (shape[0], 1))).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = b.to("cuda")
    dense = np.abs(b.to_dense().astype(np.float64))
    for effort in [0.0, 0.03, 0.25, 0.5, 0.9, 1.0]:
        for n_tok in (1, 3):
            x = fresh_x(gen, n_tok, shape[0], DTYPES[dtype])
            x = x[0] if n_tok == 1 else x
            y, info = run_gpu(x, bc, effort)
            ref, mults = reference_out(x, b, effort)
            assert info.mults == sum(mults), (effort, info.mults, mults)
            assert_close(y, ref, scale(x, b, dense), 2e-5)


def test_ties_and_partial_load(gen, rng):
    w = rng.integers(-2, 3, (300, 64)).astype(np.float16)  # many equal statistics
    full = pyeffort.build_buckets(w)
    n_rows = 16 * 300 * 3 // 8
    part = pyeffort.Buckets(
        full.values[:n_rows], full.positions[:n_rows], full.stats, full.order, full.n_out
    )
    for b in (full, part):
        bc = b.to("cuda")
        for effort in [0.1, 0.3, 0.37, 0.5, 1.0]:
            x = torch.randint(-1, 2, (2, 300), generator=gen, device="cuda").half()
            y, info = run_gpu(x, bc, effort)
            ref, mults = reference_out(x, b, effort)
            assert info.mults == sum(mults)
            assert_close(y, ref, scale(x, b), 2e-5)


@pytest.mark.parametrize("splits", [None, 1])
def test_many_equal_keys(gen, rng, splits):
    """More tied candidates than a block keeps in shared memory (splits=1: 16384 rows in one
    split, two passes of keys, and the rescan of the split for the candidates at the end)."""
    w = rng.choice([-1.0, 1.0], (1024, 64)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = cuda.to_device(b, "cuda", splits=splits)
    for effort in [0.3, 0.7]:
        x = torch.randint(1, 3, (2, 1024), generator=gen, device="cuda").half()
        x[1] = x[1].sign()  # every key equal
        y, info = run_gpu(x, bc, effort)
        ref, mults = reference_out(x, b, effort)
        assert info.mults == sum(mults)
        assert_close(y, ref, scale(x, b), 2e-5)


@pytest.mark.parametrize("shape", [(5000, 300), (1000, 2100)])
def test_one_split_many_passes(shape, gen, rng):
    """splits=1: the split holds more rows than one pass of keys in registers (4096). Low
    efforts append the sure rows of several passes to one list, higher ones overflow it and
    stream the remaining passes one by one; the same bits on a repeat call."""
    w = (rng.standard_normal(shape) * rng.lognormal(0, 0.7, (shape[0], 1))).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = cuda.to_device(b, "cuda", splits=1)
    for effort in [0.02, 0.1, 0.25, 0.5, 1.0]:
        x = fresh_x(gen, 2, shape[0], torch.float16)
        y, info = run_gpu(x, bc, effort)
        ref, mults = reference_out(x, b, effort)
        assert info.mults == sum(mults)
        assert_close(y, ref, scale(x, b), 2e-5)
        y2, _ = run_gpu(x, bc, effort)
        assert torch.equal(y.view(torch.int32), y2.view(torch.int32))


@pytest.mark.parametrize("partial", [False, True])
def test_one_split_two_passes(partial, gen, rng):
    """splits=1 with 4097..8192 rows: exactly two passes of keys (as w1/w3 of a 7B model at
    ct 128). Every mode: effort 0, searches, an overflowing list, 1.0 (full load), above the
    loaded rows (partial load); the same bits on a repeat call."""
    w = (rng.standard_normal((500, 300)) * rng.lognormal(0, 0.7, (500, 1))).astype(np.float16)
    b = pyeffort.build_buckets(w)
    if partial:  # 6000 of 8000 rows
        b = pyeffort.Buckets(b.values[:6000], b.positions[:6000], b.stats, b.order, b.n_out)
    bc = cuda.to_device(b, "cuda", splits=1)
    for effort in [0.0, 0.02, 0.1, 0.25, 0.5, 0.8, 1.0]:
        x = fresh_x(gen, 2, 500, torch.float16)
        y, info = run_gpu(x, bc, effort)
        ref, mults = reference_out(x, b, effort)
        assert info.mults == sum(mults), (effort, info.mults, mults)
        assert_close(y, ref, scale(x, b), 2e-5)
        y2, _ = run_gpu(x, bc, effort)
        assert torch.equal(y.view(torch.int32), y2.view(torch.int32))


@pytest.mark.parametrize("ct", [32, 64, 128, 256])
def test_tile_widths(ct, gen, rng):
    w = rng.standard_normal((700, 2000)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = cuda.to_device(b, "cuda", ct=ct)
    for effort in [0.3, 1.0]:
        x = fresh_x(gen, 1, 700, torch.float16)
        y, info = run_gpu(x, bc, effort)
        ref, mults = reference_out(x, b, effort)
        assert info.mults == sum(mults)
        assert_close(y, ref, scale(x, b), 2e-5)


def test_group_matches_reference(gen, rng):
    """GROUP_MAX (4) matrices with one input in one kernel: each its own cutoff, as separate
    calls."""
    shapes = [(512, 1000), (512, 200), (512, 37), (512, 300)][: pyeffort.api.GROUP_MAX]
    bs = [
        pyeffort.build_buckets(rng.standard_normal(s).astype(np.float16) * (i + 1))
        for i, s in enumerate(shapes)
    ]
    bcs = [cuda.to_device(b, "cuda", ct=32) for b in bs]
    grp = cuda.CudaGroup(bcs)
    for effort in [0.0, 0.2, 0.6, 1.0]:
        x = fresh_x(gen, 2, 512, torch.bfloat16)
        outs = [torch.full((2, b.n_out), float("nan"), device="cuda") for b in bs]
        ys, infos = cuda.matmul_group(x, grp, effort, outs=outs, return_info=True)
        for b, y, info in zip(bs, ys, infos):
            ref, mults = reference_out(x, b, effort)
            assert info.mults == sum(mults)
            assert_close(y, ref, scale(x, b), 2e-5)
        again = cuda.matmul_group(x, grp, effort)
        assert all(torch.equal(a, b) for a, b in zip(ys, again))
    with pytest.raises(pyeffort.ShapeError):
        cuda.CudaGroup([bcs[0], cuda.to_device(bs[0], "cuda", ct=64)])  # two tile widths
    with pytest.raises(pyeffort.ShapeError):  # one limit on every backend
        cuda.CudaGroup(bcs + [cuda.to_device(bs[0], "cuda", ct=32)])
    x = fresh_x(gen, 1, 512, torch.float16)  # pyeffort.matmul_group dispatches a list too
    ys, infos = pyeffort.matmul_group(x[0], bcs[:2], 0.3, return_info=True)
    for b, y, info in zip(bs, ys, infos):  # a group's split sums add in another order than a
        ref, mults = reference_out(x, b, 0.3)  # call alone: equal to the reference, not bitwise
        assert info.mults == sum(mults)
        assert_close(y[None], ref, scale(x, b), 2e-5)


def test_alone_and_grouped_calls_interleave(gen, rng):
    """The meeting counters of a matrix only grow (no reset at the end of a call): calls alone
    and in a group, with other split and worker counts, interleave and stay right."""
    bs = [
        pyeffort.build_buckets(rng.standard_normal((1024, n)).astype(np.float16))
        for n in (3000, 700)
    ]
    bcs = [cuda.to_device(b, "cuda", ct=32) for b in bs]
    grp = cuda.CudaGroup(bcs)
    for effort in (0.3, 1.0, 0.05):
        x = fresh_x(gen, 1, 1024, torch.float16)
        refs = [reference_out(x, b, effort) for b in bs]
        for _ in range(2):
            ys, infos = cuda.matmul_group(x, grp, effort, return_info=True)
            for bc, b, y, info, (ref, mults) in zip(bcs, bs, ys, infos, refs):
                assert info.mults == sum(mults)
                assert_close(y, ref, scale(x, b), 2e-5)
                y1, info1 = run_gpu(x, bc, effort)
                assert info1.mults == sum(mults)
                assert_close(y1, ref, scale(x, b), 2e-5)


def test_deterministic_pdl_and_coop_off(gen, rng):
    w = rng.standard_normal((2048, 3000)).astype(np.float16)
    bc = pyeffort.build_buckets(w).to("cuda")
    x = fresh_x(gen, 1, 2048, torch.float16)[0]
    first = pyeffort.matmul(x, bc, 0.3)
    for pdl, coop in ((True, True), (False, True), (True, False), (True, True)):
        cuda.set_pdl(pdl)
        cuda.set_coop(coop)
        assert torch.equal(pyeffort.matmul(x, bc, 0.3), first)
    cuda.set_pdl(True)
    cuda.set_coop(True)


def test_graph_with_device_effort(gen, rng):
    w = rng.standard_normal((1024, 2048)).astype(np.float16)
    bc = pyeffort.build_buckets(w).to("cuda")
    x = fresh_x(gen, 1, 1024, torch.bfloat16)[0]
    eff = torch.tensor([0.5], dtype=torch.float64, device="cuda")
    y = torch.empty(2048, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pyeffort.matmul(x, bc, eff, out=y)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pyeffort.matmul(x, bc, eff, out=y)
    for e in (0.5, 0.2, 1.0, 0.0, 0.07):
        x.copy_(fresh_x(gen, 1, 1024, torch.bfloat16)[0])
        y.fill_(float("nan"))
        eff.fill_(e)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, pyeffort.matmul(x, bc, e)), e


@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_builder_matches_cpu_builder(rng, weighted):
    for shape in [(64, 40), (513, 1000), (1024, 4096)]:
        w = rng.standard_normal(shape).astype(np.float16)
        w[::7] = np.round(w[::7])  # ties inside groups
        a = np.exp(rng.standard_normal(shape[1])).astype(np.float32) if weighted else None
        b = pyeffort.build_buckets(w, out_weight=a)
        values, positions, stats, order = cuda.build_canonical(torch.from_numpy(w).cuda(), a)
        np.testing.assert_array_equal(values.cpu().numpy(), b.values)
        np.testing.assert_array_equal(positions.cpu().numpy(), b.positions)
        np.testing.assert_array_equal(stats.cpu().numpy(), b.stats)
        np.testing.assert_array_equal(order.cpu().numpy(), b.order)


def _real_mats():
    path = os.environ.get("PYEFFORT_REAL_NPZ")
    if path and os.path.exists(path):
        z = np.load(path)
        names = sorted({k.rsplit("/", 1)[0] for k in z.files})
        return [(n, z[n + "/W"], z[n + "/X"]) for n in names]
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments" / "quality"))
    try:
        import realdata

        return [(n, w, xs[[3, 9, 15]]) for n, w, xs in realdata.capture(n_tokens=16)[:7]]
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"no real weights here: {exc}")


def test_matches_reference_real_weights():
    for name, w, xs in _real_mats():
        b = pyeffort.build_buckets(w.astype(np.float16))
        bc = b.to("cuda")
        for dtype in ("f16", "bf16"):
            x = torch.from_numpy(xs).cuda().to(DTYPES[dtype]).contiguous()
            for effort in [0.1, 0.25, 0.5, 1.0]:
                y, info = run_gpu(x, bc, effort)
                ref, mults = reference_out(x, b, effort)
                assert info.mults == sum(mults), name
                assert abs(info.effort - effort) <= 0.01, (name, effort, info.effort)
                assert_close(y, ref, scale(x, b), 2e-5)


def test_output_in_activation_dtype(gen, rng):
    w = rng.standard_normal((512, 700)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = b.to("cuda")
    for dtype in ("f16", "bf16"):
        x = fresh_x(gen, 1, 512, DTYPES[dtype])[0]
        y = cuda.matmul(x, bc, 0.4, out_dtype=DTYPES[dtype])
        assert y.dtype == DTYPES[dtype]
        ref, _ = reference_out(x, b, 0.4)
        assert_close(y, ref[0], scale(x, b)[0], 1e-2)


# ---------------------------------------------------------------- q8 values


def reference_info(x: torch.Tensor, b: pyeffort.Buckets, effort: float):
    """reference.bucketmul per token (q8 scales included) -> (y, mults, bytes read)."""
    x32 = x.float().cpu().numpy().reshape(-1, b.n_in)
    y = np.empty((x32.shape[0], b.n_out), dtype=np.float32)
    mults = nbytes = 0
    for t in range(x32.shape[0]):
        m, nb = reference.bucketmul(
            x32[t : t + 1],
            b.values,
            b.positions,
            b.stats,
            b.order,
            b.n_out,
            effort,
            y[t : t + 1],
            scales=b.scales,
        )
        mults, nbytes = mults + m, nbytes + nb
    return y, mults, nbytes


def check_q8(x, b, bc, effort, dense=None, repeat=False):
    """One call of bc (q8) against the reference: outputs within 2e-5 of the sum of |x * w|
    (float32 sums; the scale applied as (x * scale) * q: one more float32 rounding per product
    than x * (q * scale)), the realised multiplications and the bytes read exactly."""
    y, info = run_gpu(x, bc, effort)
    ref, mults, nbytes = reference_info(x, b, effort)
    assert (info.mults, info.bytes_read) == (mults, nbytes), (effort, info, mults, nbytes)
    assert_close(y, ref, scale(x, b, dense), 2e-5)
    if repeat:  # the same bits on a repeat call
        y2, _ = run_gpu(x, bc, effort)
        assert torch.equal(y.view(torch.int32), y2.view(torch.int32))


def q8_prefix(b: pyeffort.Buckets, n_rows: int) -> pyeffort.Buckets:
    """A partial load of b: its first n_rows rows and the scales they need."""
    return pyeffort.Buckets(
        b.values[:n_rows],
        b.positions[:n_rows],
        b.stats,
        b.order,
        b.n_out,
        scales=b.scales[: reference.scale_rows(n_rows, b.n_in)],
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_q8_matches_reference_random(shape, dtype, gen, rng):
    w = (rng.standard_normal(shape) * rng.lognormal(0, 0.7, (shape[0], 1))).astype(np.float16)
    b = pyeffort.build_buckets(w, values="q8")
    bc = b.to("cuda")
    assert bc.values_kind == "q8" and bc.nbytes == b.nbytes
    dense = np.abs(b.to_dense().astype(np.float64))
    for effort in [0.0, 0.03, 0.1, 0.5, 1.0]:
        for n_tok in (1, 3):
            x = fresh_x(gen, n_tok, shape[0], DTYPES[dtype])
            check_q8(x[0] if n_tok == 1 else x, b, bc, effort, dense, repeat=n_tok == 1)


@pytest.mark.parametrize("loaded", [1.0, 0.6, 0.3, 0.07])
@pytest.mark.parametrize("splits", [None, 1])
def test_q8_partial_loads(loaded, splits, gen, rng):
    """Prefixes of the rows (a partial tier among them) with their scales; splits=1 streams
    many passes of one split (5000 inputs: 80000 rows); 1.0 above a partial load's rows."""
    w = (rng.standard_normal((5000, 300)) * rng.lognormal(0, 0.7, (5000, 1))).astype(np.float16)
    b = q8_prefix(pyeffort.build_buckets(w, values="q8"), int(16 * 5000 * loaded))
    bc = cuda.to_device(b, "cuda", splits=splits)
    for effort in [0.0, 0.02, 0.1, 0.5, 1.0]:
        check_q8(fresh_x(gen, 2, 5000, torch.float16), b, bc, effort, repeat=True)


def test_q8_ties_and_many_equal_keys(gen, rng):
    """Equal keys: more tied candidates than a block keeps (the rescan of the split), on a
    full and a partial load."""
    w = rng.choice([-1.0, 1.0], (1024, 64)).astype(np.float16)
    w[::3] *= 3
    full = pyeffort.build_buckets(w, values="q8")
    for b in (full, q8_prefix(full, 16 * 1024 * 3 // 8)):
        for splits in (None, 1):
            bc = cuda.to_device(b, "cuda", splits=splits)
            for effort in [0.1, 0.3, 0.7, 1.0]:
                x = torch.randint(1, 3, (2, 1024), generator=gen, device="cuda").half()
                x[1] = x[1].sign()  # every key of a rank equal
                check_q8(x, b, bc, effort, repeat=True)


@pytest.mark.parametrize("ct", [32, 64, 128, 256])
def test_q8_tile_widths(ct, gen, rng):
    w = rng.standard_normal((700, 2000)).astype(np.float16)
    b = pyeffort.build_buckets(w, values="q8")
    bc = cuda.to_device(b, "cuda", ct=ct)
    for effort in [0.1, 0.5, 1.0]:
        check_q8(fresh_x(gen, 1, 700, torch.float16), b, bc, effort)


def test_q8_group_matches_reference(gen, rng):
    """GROUP_MAX q8 matrices in one kernel, each its own cutoff; a group mixing the value
    kinds is refused (the kernel is compiled per kind)."""
    shapes = [(512, 1000), (512, 200), (512, 37), (512, 300)][: pyeffort.api.GROUP_MAX]
    bs = [
        pyeffort.build_buckets(rng.standard_normal(s).astype(np.float16) * (i + 1), values="q8")
        for i, s in enumerate(shapes)
    ]
    bcs = [cuda.to_device(b, "cuda", ct=32) for b in bs]
    grp = cuda.CudaGroup(bcs)
    for effort in [0.0, 0.1, 0.5, 1.0]:
        for dtype in ("f16", "bf16", "f32"):
            x = fresh_x(gen, 2, 512, DTYPES[dtype])
            outs = [torch.full((2, b.n_out), float("nan"), device="cuda") for b in bs]
            ys, infos = cuda.matmul_group(x, grp, effort, outs=outs, return_info=True)
            for b, y, info in zip(bs, ys, infos):
                ref, mults, nbytes = reference_info(x, b, effort)
                assert (info.mults, info.bytes_read) == (mults, nbytes)
                assert_close(y, ref, scale(x, b), 2e-5)
            again = cuda.matmul_group(x, grp, effort)
            assert all(torch.equal(a, b) for a, b in zip(ys, again))
    f16 = cuda.to_device(
        pyeffort.build_buckets(rng.standard_normal((512, 64)).astype(np.float16)), "cuda", ct=32
    )
    with pytest.raises(pyeffort.ShapeError, match="value kind"):
        cuda.CudaGroup([bcs[0], f16])


def test_q8_graph_with_device_effort(gen, rng):
    w = rng.standard_normal((1024, 2048)).astype(np.float16)
    bc = pyeffort.build_buckets(w, values="q8").to("cuda")
    x = fresh_x(gen, 1, 1024, torch.bfloat16)[0]
    eff = torch.tensor([0.5], dtype=torch.float64, device="cuda")
    y = torch.empty(2048, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pyeffort.matmul(x, bc, eff, out=y)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pyeffort.matmul(x, bc, eff, out=y)
    for e in (0.5, 0.1, 1.0, 0.0, 0.25):
        x.copy_(fresh_x(gen, 1, 1024, torch.bfloat16)[0])
        y.fill_(float("nan"))
        eff.fill_(e)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, cuda.matmul(x, bc, e, out_dtype=torch.bfloat16)), e


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_group_with_an_effort_per_matrix(gen, rng, values):
    """One effort per matrix (a float64 CUDA tensor, as a model's budget split, or a list): each
    matrix the same bits, realised multiplications and bytes as its call alone in a group of
    its splits, and the reference's at its effort; in a CUDA graph too, the efforts changed
    between replays. A wrong length, dtype or device raises."""
    shapes = [(512, 1000), (512, 200), (512, 37)]
    bs = [
        pyeffort.build_buckets(rng.standard_normal(s).astype(np.float16) * (i + 1), values=values)
        for i, s in enumerate(shapes)
    ]
    bcs = [cuda.to_device(b, "cuda", ct=32) for b in bs]
    grp = cuda.CudaGroup(bcs)
    alone = [cuda.CudaGroup([bc], splits=sp) for bc, sp in zip(bcs, grp.splits)]
    x = fresh_x(gen, 2, 512, torch.float16)
    eff = torch.ones(3, dtype=torch.float64, device="cuda")
    outs = [torch.empty((2, b.n_out), device="cuda") for b in bs]
    cuda.matmul_group(x, grp, eff, outs=outs)  # warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda.matmul_group(x, grp, eff, outs=outs)
    for efforts in ([1.0, 0.3, 0.01], [0.0, 1.0, 0.2], [0.25, 0.25, 0.6]):
        x.copy_(fresh_x(gen, 2, 512, torch.float16))
        eff.copy_(torch.tensor(efforts, dtype=torch.float64))
        ys, infos = cuda.matmul_group(x, grp, eff, return_info=True)
        ys_list, infos_list = cuda.matmul_group(x, grp, efforts, return_info=True)
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for i, (b, a, e) in enumerate(zip(bs, alone, efforts)):
            (y1,), (info1,) = cuda.matmul_group(x, a, e, return_info=True)
            for y in (ys[i], ys_list[i], outs[i]):
                assert torch.equal(y.view(torch.int32), y1.view(torch.int32)), (efforts, i)
            assert infos[i] == infos_list[i] == info1, (efforts, i)
            ref, mults, nbytes = reference_info(x, b, e)
            assert (info1.mults, info1.bytes_read) == (mults, nbytes), (efforts, i)
            assert_close(y1, ref, scale(x, b), 2e-5)
    with pytest.raises(pyeffort.ShapeError):
        cuda.matmul_group(x, grp, eff[:2])
    with pytest.raises(pyeffort.ShapeError):
        cuda.matmul_group(x, grp, [0.5, 0.3])
    with pytest.raises(pyeffort.DTypeError):
        cuda.matmul_group(x, grp, eff.float())
    with pytest.raises(pyeffort.DTypeError):
        cuda.matmul_group(x, grp, eff.cpu())


@pytest.mark.parametrize("weighted", [False, True])
def test_q8_gpu_builder_matches_cpu_builder(rng, weighted):
    """cuda.build_buckets(values="q8") quantises on the GPU as reference.quantise_q8 does, bit
    for bit, and repacks as B.to("cuda") does."""
    for shape in [(64, 40), (513, 1000), (1024, 4096)]:
        w = rng.standard_normal(shape).astype(np.float16)
        w[::7] = np.round(w[::7])  # ties inside groups
        a = np.exp(-np.abs(rng.standard_normal(shape[1]))).astype(np.float32) if weighted else None
        b = pyeffort.build_buckets(w, out_weight=a, values="q8")
        bc = cuda.build_buckets(torch.from_numpy(w).cuda(), a, values="q8")
        assert bc.values_kind == "q8"
        assert torch.equal(bc.wt, b.to("cuda").wt) and torch.equal(bc._slot, b.to("cuda")._slot)
    with pytest.raises(ValueError, match="values"):
        cuda.build_buckets(torch.from_numpy(w).cuda(), values="q4")


def test_bad_inputs_raise(rng):
    b = pyeffort.build_buckets(rng.standard_normal((64, 32)).astype(np.float16))
    bc = b.to("cuda")
    x = torch.ones(64, device="cuda", dtype=torch.float16)
    with pytest.raises(pyeffort.DTypeError):
        pyeffort.matmul(x, b, 0.5)  # host Buckets with CUDA activations
    with pytest.raises(pyeffort.DTypeError):
        pyeffort.matmul(x.int(), bc, 0.5)
    with pytest.raises(pyeffort.ShapeError):
        pyeffort.matmul(torch.ones(65, device="cuda", dtype=torch.float16), bc, 0.5)
    with pytest.raises(pyeffort.LayoutError):
        pyeffort.matmul(torch.ones((64, 2), device="cuda").half().t(), bc, 0.5)
    with pytest.raises(pyeffort.EffortError):
        pyeffort.matmul(x, bc, 1.5)
    with pytest.raises(pyeffort.DTypeError):
        pyeffort.matmul(x, bc, torch.tensor([0.5], device="cuda"))  # float32 effort tensor
    with pytest.raises(pyeffort.DTypeError):
        pyeffort.matmul(x, bc, 0.5, out=torch.empty(32, device="cuda", dtype=torch.bfloat16))
    buf = torch.ones(64, device="cuda", dtype=torch.float16)
    with pytest.raises(pyeffort.LayoutError, match="shares memory"):  # the kernel reads x late
        pyeffort.matmul(buf, bc, 0.5, out=buf[16:48])


@pytest.fixture
def cluster_kernel():
    """The cluster kernel for the matrices made in the test (then the previous one back)."""
    old, old_tol = cuda._KERNEL, cuda._TOL
    cuda.set_kernel("cluster")
    yield cuda
    cuda.set_kernel(old)
    cuda.set_tolerance(old_tol)


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_cluster_kernel_tolerance_and_layout(cluster_kernel, values, gen, rng):
    """The cluster kernel on the GPU: exact (tolerance 0) it is the reference; with 0.02 each
    call's realised count lies within 0.02 n_in n_out of the budget and its outputs are the
    reference's at that count; every tile's cluster fits the device in one wave."""
    n_in, n_out = 4096, 4100
    W = (rng.standard_normal((n_in, n_out)) * rng.uniform(0.1, 3, n_out)).astype(np.float16)
    b = pyeffort.build_buckets(W, values=values)
    bc = b.to("cuda")
    assert bc.kernel == "cluster" and bc._alone.kernel == "cluster"
    fits = cuda.cluster_fits(bc.device)
    assert bc.n_tiles <= fits(bc.n_splits, bc.ct), (bc.n_tiles, bc.n_splits, bc.ct)
    n = n_in * n_out
    for tol in (0.0, 0.02):
        cuda.set_tolerance(tol)
        for effort in (0.5, 0.2, 0.03):
            x = fresh_x(gen, 1, n_in, torch.float16)
            y, info = run_gpu(x, bc, effort)
            assert abs(info.mults - effort * n) <= tol * n + (0 if tol else n)
            at = effort if tol == 0 else (info.mults - 0.5) / n  # the same rows, exactly
            ref, mults, nbytes = reference_info(x, b, at)
            assert (info.mults, info.bytes_read) == (mults, nbytes), (tol, effort, info)
            dense = np.abs(b.to_dense().astype(np.float64)) if values == "q8" else None
            assert_close(y, ref, scale(x, b, dense), 2e-5)
