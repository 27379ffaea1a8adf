"""src/cuda's kernels without a GPU: compiled as C++17 against the CUDA shim (tests/cuda_shim)
and run by its grid simulator (every block of a grid at once, every CUDA thread a fiber meeting
at real barriers) under AddressSanitizer, through the library's own C API (pe_cuda.h) with the
device buffers prepared as pyeffort/cuda.py does. Against reference.py: the realised
multiplications, bytes read and cutoff exactly, the outputs up to float32 summation order, the
same bits from two calls; a kernel that reads or writes out of bounds, misses a barrier or
deadlocks fails. Timing and the GPU's weaker memory model are not simulated (DEVELOPERS.md)."""

import os
import shutil
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort import dense, reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_shim"))
import cuda_sim as shim  # not "shim": tests/test_metal*.py import tests/metal_shim/shim.py

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and "CXX" not in os.environ, reason="needs g++"
)
INVALID = 0xFFFFFFFF  # the cut of a call at effort 0 (no row)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return shim.build(tmp_path_factory.mktemp("cuda_shim"))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="cuda.repack builds the device layout with torch")


def check_call(B, call: shim.Call, res: shim.Result, i: int = 0, effort=None) -> None:
    """One call's result for matrix i of its group against the reference at matrix i's effort
    (cuda._run's info from the state; the cut and last mults of the call's last token); with
    `effort`, at that effort instead and the cut not compared (a tolerance's selection)."""
    exact_cut = effort is None
    effort = call.effort_of(i) if effort is None else effort
    x32 = np.atleast_2d(call.x).astype(np.float32)
    if call.xd == "bf16":
        x32 = (np.atleast_2d(call.x).astype(np.uint32) << 16).view(np.float32)
    ref = np.empty((x32.shape[0], B.n_out), dtype=np.float32)
    args = (B.values, B.positions, B.stats, B.order, B.n_out, effort, ref, B.scales)
    mults, nbytes = reference.bucketmul(x32, *args)
    st = res.state[i]
    info_mults, rows, records = (int(v) for v in st[5:8])
    assert info_mults == mults, (effort, info_mults, mults)
    extra = 2 * reference.n_chunks(B.n_groups) * records if B.scales is not None else 0
    assert rows * reference.row_bytes(B.n_groups, B.scales is not None) + extra == nbytes
    c, disp = reference.cutoff(x32[-1], B.stats, B.order, B.n_rows, B.n_out, effort)
    m = np.repeat(reference.row_mults(B.n_out), B.n_in)[: B.n_rows]
    want = int(np.float32(c).view(np.uint32))  # the cut, as a search finds it
    if effort <= 0:
        want = INVALID
    elif effort * B.n_in * B.n_out >= m.sum() and B.n_out >= 16:  # every row: no search
        want = 0
    if exact_cut:
        assert int(st[3]) & 0xFFFFFFFF == want, (effort, int(st[3]) & 0xFFFFFFFF, want)
    assert int(st[4]) == int(m[disp].sum())  # the last token's realised multiplications
    y = res.y[i]
    assert np.isfinite(y).all(), "an output was not written"
    sc = np.abs(x32).astype(np.float64) @ np.abs(B.to_dense().astype(np.float64))
    err = np.abs(y.astype(np.float64) - ref)
    rel = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3}[call.y]  # 16-bit outputs: rounded once more
    assert (err <= 2e-5 * sc + rel * np.abs(ref) + 1e-7 * sc.max() + 1e-30).all(), err.max()


def same_call(a: shim.Call, b: shim.Call) -> bool:
    """The same x (one array), effort and dtypes."""
    return a.x is b.x and (a.effort, a.xd, a.y) == (b.effort, b.xd, b.y)


def run_and_check(exe, Bs, phases, ct=None, kernel="coop"):
    """shim.effort_calls, every call checked, and calls at one effort in a row with the same x
    giving the same bits."""
    results = shim.effort_calls(exe, Bs, phases, ct=ct, kernel=kernel)
    for (idx, _, calls), res in zip(phases, results):
        for k, (call, r) in enumerate(zip(calls, res)):
            for i, b in enumerate(idx):
                check_call(Bs[b], call, r, i)
                if k and same_call(calls[k - 1], call):
                    assert res[k - 1].y[i].tobytes() == r.y[i].tobytes(), (call.effort, i)
    return results


def random_buckets(rng, shape, values="f16"):
    W = (rng.standard_normal(shape) * rng.uniform(0.1, 3, shape[1])).astype(np.float16)
    return pyeffort.build_buckets(W, values=values)


def random_x(rng, n_tok, n_in, dtype=np.float32):
    return (rng.standard_normal((n_tok, n_in)) * rng.uniform(0, 4, n_in)).astype(dtype)


def twice(x, efforts, **kw):
    """A call per effort, each made twice (the second must give the same bits)."""
    return [shim.Call(x, e, **kw) for e in efforts for _ in range(2)]


EFFORTS = [1.0, 0.5, 0.25, 0.01, 0.0]

# n_out: a tail of 5 (G = 3), 11, 2 (a split of two passes: 4800 rows), 4 (3 tiles of 64
# groups), and tile widths 128 and 256 chosen for 40 groups
CASES = [
    ((64, 37), "f16", 3, None, EFFORTS, {}),
    ((100, 75), "q8", 2, None, EFFORTS, {"y": "f16"}),
    ((300, 50), "f16", 1, None, [0.5, 0.25], {}),
    ((300, 50), "q8", 1, None, [0.5, 0.01], {}),
    ((40, 2100), "f16", 2, None, [0.25], {}),
    ((40, 640), "q8", 2, 128, [0.25, 1.0], {}),
    ((40, 640), "f16", 1, 256, [0.5], {}),
    ((64, 48), "f16", 2, None, [0.25, 0.5], {}),
    ((300, 7), "q8", 2, None, [1.0, 0.5], {}),  # ranks >= 7 hold no output: searched at 1.0
]


@pytest.mark.parametrize("shape, values, splits, ct, efforts, kw", CASES)
def test_effort_kernel_matches_the_reference(
    exe, torch, rng, shape, values, splits, ct, efforts, kw
):
    B = random_buckets(rng, shape, values)
    x = random_x(rng, 1, shape[0], np.float16 if values == "q8" else np.float32)
    run_and_check(exe, [B], [([0], splits, twice(x, efforts, **kw))], ct=ct)


# the cluster kernel (cluster.cu): splits is the cluster size; C = 1 and 2 with two passes,
# 16 on 40 and 64 inputs (one pass, splits of few stripes)
CLUSTER_CASES = [
    ((64, 37), "f16", 2, None, EFFORTS, {}),
    ((100, 75), "q8", 4, None, EFFORTS, {"y": "f16"}),
    ((300, 50), "f16", 1, None, [0.5, 0.25, 1.0], {}),
    ((300, 50), "q8", 8, None, [0.5, 0.01], {}),
    ((40, 2100), "f16", 2, None, [0.25], {}),
    ((40, 640), "q8", 16, 128, [0.25, 1.0], {}),
    ((64, 48), "f16", 16, None, [0.25, 0.5, 0.0], {}),
    ((300, 7), "q8", 2, None, [1.0, 0.5], {}),
]


@pytest.mark.parametrize("shape, values, C, ct, efforts, kw", CLUSTER_CASES)
def test_cluster_kernel_matches_the_reference(exe, torch, rng, shape, values, C, ct, efforts, kw):
    B = random_buckets(rng, shape, values)
    x = random_x(rng, 1, shape[0], np.float16 if values == "q8" else np.float32)
    run_and_check(exe, [B], [([0], C, twice(x, efforts, **kw))], ct=ct, kernel="cluster")


def test_cluster_kernel_ties_tokens_and_groups(exe, torch, rng):
    """The cluster kernel where the coop kernel's special cases are: every key equal (a split's
    4800 candidates, more than shared memory keeps: levels 2-3 and the take from the keys again),
    a budget met exactly in the last level, three tokens, bfloat16, an effort from device
    memory, and a group with an effort per matrix giving each matrix's bits alone."""
    W = rng.choice([-1.0, 1.0], (300, 64)).astype(np.float16)
    Bt = pyeffort.build_buckets(W)
    xs = np.sign(random_x(rng, 1, 300)).astype(np.float32)
    x01 = np.r_[np.ones(150), np.zeros(150)].astype(np.float32)[None]
    ties = [shim.Call(xs, 0.3), shim.Call(xs, 0.3), shim.Call(x01, 0.7), shim.Call(x01, 0.2)]
    # C = 1, 2: a block keeps only some of its candidates; C = 8: each keeps all, but the
    # cluster's 4800 are more than a gather holds: levels 2-3 across the cluster
    phases = [([0], 1, ties), ([0], 2, ties[:1]), ([0], 8, ties[:1])]
    run_and_check(exe, [Bt], phases, kernel="cluster")
    Be = pyeffort.build_buckets(rng.choice([-1.0, 1.0], (8, 16)).astype(np.float16))
    xe = np.array([8, -7, 6, 5, -4, 3, 1 + 5 * 2**-23, -(1 + 3 * 2**-23)], dtype=np.float32)
    run_and_check(exe, [Be], [([0], 2, [shim.Call(xe, 7 / 8)])], kernel="cluster")
    B = random_buckets(rng, (96, 100))
    x3 = random_x(rng, 3, 96)
    bf = (random_x(rng, 2, 96).view(np.uint32) >> 16).astype(np.uint16)
    calls = [shim.Call(x3, 0.3, by_ptr=True), shim.Call(bf, 0.4, xd="bf16", y="bf16")]
    run_and_check(exe, [B], [([0], 4, calls)], kernel="cluster")
    Bs = [random_buckets(rng, (64, n)) for n in (37, 75, 16)]
    x = random_x(rng, 2, 64)
    per = [[1.0, 0.3, 0.01], [0.0, 1.0, 0.3]]
    alone = [([i], 2, [shim.Call(x, e[i]) for e in per]) for i in range(3)]
    res = run_and_check(
        exe, Bs, [([0, 1, 2], 2, [shim.Call(x, e) for e in per]), *alone], kernel="cluster"
    )
    for i in range(3):
        for c in range(len(per)):
            assert res[0][c].y[i].tobytes() == res[1 + i][c].y[0].tobytes(), (i, per[c])


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_cluster_kernel_with_a_tolerance(exe, torch, rng, values):
    """tol 0.02: each call's realised multiplications within 0.02 n_in n_out of the budget, and
    its outputs, bytes and count those of the exact rule at the realised count (the set taken is
    every row with key >= a cut: the reference's at that effort). Random weights take the
    level-1 shortcut (the count moves off the exact budget); equal keys (one bin holds them all)
    take the exact search."""
    B = random_buckets(rng, (300, 50), values)
    x = random_x(rng, 1, 300, np.float16 if values == "q8" else np.float32)
    calls = [shim.Call(x, e, tol=0.02) for e in (0.5, 0.3, 0.1, 0.03)]
    W = rng.choice([-1.0, 1.0], (64, 48)).astype(np.float16)
    Bt = pyeffort.build_buckets(W, values=values)
    xt = np.ones((1, 64), np.float16 if values == "q8" else np.float32)
    ties = [shim.Call(xt, 0.3, tol=0.02)]
    res = shim.effort_calls(exe, [B, Bt], [([0], 4, calls), ([1], 2, ties)], kernel="cluster")
    n = B.n_in * B.n_out
    moved = 0
    m = np.repeat(reference.row_mults(B.n_out), B.n_in)[: B.n_rows]
    for call, r in zip(calls, res[0]):
        got = int(r.state[0][5])
        assert abs(got - call.effort * n) <= 0.02 * n, (call.effort, got)
        # the nearer edge of the level-1 bin of the exact cut: off by at most half its weight
        x32 = call.x.astype(np.float32)[0]
        c, _ = reference.cutoff(x32, B.stats, B.order, B.n_rows, B.n_out, call.effort)
        keys = (np.abs(x32)[B.order] * B.stats).astype(np.float32).ravel()[: B.n_rows]
        in_bin = keys.view(np.uint32) >> 19 == np.float32(c).view(np.uint32) >> 19
        assert abs(got - call.effort * n) <= m[in_bin].sum() / 2, (call.effort, got)
        moved += got != reference.bucketmul(
            call.x.astype(np.float32), B.values, B.positions, B.stats, B.order, B.n_out,
            call.effort, np.empty((1, B.n_out), np.float32), B.scales,
        )[0]  # fmt: skip
        check_call(B, call, r, effort=(got - 0.5) / n)
    assert moved, "no call took the level-1 shortcut"
    check_call(Bt, ties[0], res[1][0])  # the exact cut


def test_tokens_bf16_and_an_effort_on_the_device(exe, torch, rng):
    """Three tokens per call (a launch each, the info summed), bfloat16 activations, the effort
    read from device memory."""
    B = random_buckets(rng, (96, 100))
    x3 = random_x(rng, 3, 96)
    bf = (random_x(rng, 2, 96).view(np.uint32) >> 16).astype(np.uint16)  # truncated: exact
    calls = [
        shim.Call(x3, 0.3),
        shim.Call(x3, 0.3, by_ptr=True),
        shim.Call(bf, 0.4, xd="bf16"),
        shim.Call(bf, 0.4, xd="bf16", y="bf16"),
    ]
    run_and_check(exe, [B], [([0], 2, calls)])


def partial(B, fraction):
    """B with the first ``fraction`` of its rows, as a partial load keeps them."""
    n = int(fraction * B.n_rows)
    scales = None if B.scales is None else B.scales[: reference.scale_rows(n, B.n_in)]
    return pyeffort.Buckets(
        B.values[:n], B.positions[:n], B.stats, B.order, B.n_out, scales=scales, verify=False
    )


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_partial_loads(exe, torch, rng, values):
    B = partial(random_buckets(rng, (90, 130), values), 0.45)
    x = random_x(rng, 1, 90, np.float16)
    # 0.7: beyond the loaded rows (every loaded row, no search); 1.0 on a partial load likewise
    run_and_check(exe, [B], [([0], 2, twice(x, [0.25, 0.7, 0.3]))])


def test_ties_and_more_candidates_than_shared_memory_holds(exe, torch, rng):
    """Equal statistics and equal |x|: every key equal, so one split's 4800 rows are all
    candidates (more than the 1024 kept in shared memory: the split's keys scanned again)."""
    W = rng.choice([-1.0, 1.0], (300, 64)).astype(np.float16)
    B = pyeffort.build_buckets(W)
    x = np.sign(random_x(rng, 1, 300)).astype(np.float32)
    x01 = np.r_[np.ones(150), np.zeros(150)].astype(np.float32)[None]  # half the keys 0
    calls = [shim.Call(x, 0.3), shim.Call(x, 0.3), shim.Call(x01, 0.7), shim.Call(x01, 0.2)]
    run_and_check(exe, [B], [([0], 1, calls)])


def test_a_budget_met_exactly_inside_the_last_level(exe, torch, rng):
    """|w| = 1 (every statistic 1, one multiplication per row) and two inputs whose |x| differ
    only in the last 9 bits (one level-2 bin of 32 candidate rows, resolved by one warp): the
    budget of 7 inputs' rows is met exactly by the upper of the two keys, which is the cut."""
    W = rng.choice([-1.0, 1.0], (8, 16)).astype(np.float16)
    B = pyeffort.build_buckets(W)
    x = np.array([8, -7, 6, 5, -4, 3, 1 + 5 * 2**-23, -(1 + 3 * 2**-23)], dtype=np.float32)
    run_and_check(exe, [B], [([0], 1, [shim.Call(x, 7 / 8), shim.Call(x[::-1].copy(), 7 / 8)])])


def test_groups_and_a_matrix_alone_and_in_groups(exe, torch, rng):
    """Three matrices sharing x in one kernel (each its own cutoff), then one of them alone with
    other splits and two in another group: the state's bases and tags follow every change."""
    Bs = [random_buckets(rng, (64, n)) for n in (37, 75, 16)]
    x = random_x(rng, 1, 64)
    phases = [
        ([0, 1, 2], 2, twice(x, [0.3, 1.0])),
        ([1], 3, twice(x, [0.3])),
        ([2, 0], 1, [shim.Call(x, 0.6), shim.Call(x, 0.05)]),
    ]
    run_and_check(exe, Bs, phases)


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_a_group_with_an_effort_per_matrix(exe, torch, rng, values):
    """One effort per matrix read from device memory (effort_each; matrix i's at [i]), the
    modes mixed in one kernel (1.0: every row, 0.0: none, the rest searched), then one effort
    for all by a device pointer: each matrix's outputs, realised multiplications, bytes and cut
    are the reference's at its own effort, with the same bits as its calls alone (same splits)."""
    Bs = [random_buckets(rng, (64, n), values) for n in (37, 75, 16)]
    x = random_x(rng, 2, 64, np.float16 if values == "q8" else np.float32)
    per = [[1.0, 0.3, 0.01], [0.0, 1.0, 0.3]]
    calls = [shim.Call(x, e) for e in per] + [shim.Call(x, 0.3, by_ptr=True)]
    alone = [([i], 2, [shim.Call(x, e[i]) for e in per]) for i in range(3)]
    res = run_and_check(exe, Bs, [([0, 1, 2], 2, calls), *alone])
    for i in range(3):
        for c in range(len(per)):
            assert res[0][c].y[i].tobytes() == res[1 + i][c].y[0].tobytes(), (i, per[c])
            g, a = res[0][c].state[i], res[1 + i][c].state[0]  # the cut; mults, rows, records
            assert [g[3] & 0xFFFFFFFF, *g[4:8]] == [a[3] & 0xFFFFFFFF, *a[4:8]], (i, per[c])


def test_an_effort_per_matrix_needs_a_pointer(exe, torch, rng):
    """effort_each without a device pointer, or other than 0 and 1: a status, no launch."""
    B = random_buckets(rng, (64, 37))
    s = shim.Script()
    m = shim.upload(s, B, "m0")
    n_workers = shim.group(s, [m], 1)
    s.add("init")
    y, x = s.buf("y", 4 * 37, 255), s.load("x", random_x(rng, 1, 64))
    s.load("e", np.array([0.5], np.float64))
    s.add("group", 1, n_workers, y)
    for eb, each in (("-", 1), ("e", 2), ("e", -1), ("e", 1)):
        s.add("matmul", x, 0, 1, eb, 0.5, each, 0, 1, 1)
    assert s.run(exe)[0] == [0, 3, 3, 3, 0]


def test_group_efforts_are_checked_before_the_kernel(torch):
    """cuda.matmul_group's effort (cuda._effort, on CPU tensors here): one for all or one per
    matrix -> the pointer, value and effort_each of pe_cuda_matmul; a wrong length, dtype,
    device or layout raises before any launch (the kernel would read past the tensor)."""
    from pyeffort import cuda

    cpu, f64 = torch.device("cpu"), torch.float64
    one, per = torch.tensor([0.5], dtype=f64), torch.tensor([1.0, 0.3, 0.01], dtype=f64)
    assert cuda._effort(torch, 0.5, 3, cpu)[:3] == (None, 0.5, 0)
    assert cuda._effort(torch, one, 3, cpu)[:3] == (one.data_ptr(), 0.0, 0)
    assert cuda._effort(torch, per[1:], 2, cpu)[:3] == (per[1:].data_ptr(), 0.0, 1)
    assert cuda._effort(torch, [0.3, 0.3], 2, cpu)[:3] == (None, 0.3, 0)  # all equal: a value
    ptr, _, each, t = cuda._effort(torch, (1.0, 0.3, 0.01), 3, cpu)
    assert each == 1 and ptr == t.data_ptr() and t.dtype == f64 and t.tolist() == [1.0, 0.3, 0.01]
    for bad, n, err in [
        (per, 2, pyeffort.ShapeError),
        (per[None], 3, pyeffort.ShapeError),  # (1, 3)
        ([0.5, 0.3], 3, pyeffort.ShapeError),
        (np.full((3, 1), 0.5), 3, pyeffort.ShapeError),
        (per.float(), 3, pyeffort.DTypeError),
        (per.to("meta"), 3, pyeffort.DTypeError),
        (torch.ones(6, dtype=f64)[::2], 3, pyeffort.LayoutError),
        ([0.5, 1.5, 0.3], 3, pyeffort.EffortError),
    ]:
        with pytest.raises(err):
            cuda._effort(torch, bad, n, cpu)


# ---------------------------------------------------------------- the dense baselines


@pytest.mark.parametrize(
    "shape, splits, xd, yd", [((100, 37), 1, "f32", "f32"), ((70, 264), 2, "f16", "f16")]
)
def test_dense_q8_kernel_matches_the_reference(exe, rng, shape, splits, xd, yd):
    """n_out % 8 != 0 (byte loads) and == 0 (8-byte loads, two tiles), split-K partials."""
    wq = pyeffort.quantize_dense_q8(rng.standard_normal(shape).astype(np.float16))
    x = rng.standard_normal((2, shape[0])).astype(np.float16 if xd == "f16" else np.float32)
    ys = shim.dense_q8(exe, x, wq, splits=splits, y=yd)
    ref = np.empty((2, shape[1]), dtype=np.float32)
    dense.dense_q8(x.astype(np.float32), wq.q, wq.scales, ref)
    sc = np.abs(x.astype(np.float64)) @ np.abs(wq.dequantize().astype(np.float64))
    rel = 1e-3 if yd == "f16" else 0.0
    for y in ys:
        assert (np.abs(y - ref) <= 2e-5 * sc + rel * np.abs(ref) + 1e-7 * sc.max()).all()
    assert ys[0].tobytes() == ys[1].tobytes()


def kept_rows(x32: np.ndarray, k: int) -> np.ndarray:
    """The spec of channel skipping: the k rows of largest |x| in float32, ties by lower index."""
    order = np.lexsort((np.arange(x32.size), -np.abs(x32)))
    return np.sort(order[:k])


@pytest.mark.parametrize(
    "n_in, n_out, keep, splits", [(1500, 40, 0.3, 2), (200, 264, 0.5, 1), (64, 16, 0.0, 1)]
)
def test_channel_skip_kernel_matches_the_reference(exe, rng, n_in, n_out, keep, splits):
    """1500 inputs: two rounds of the select block's 1024 threads; ties in |x|; k = 0."""
    w = rng.standard_normal((n_in, n_out)).astype(np.float16)
    x = rng.integers(-3, 4, (2, n_in)).astype(np.float32) * rng.uniform(0.5, 1, (2, 1))
    k = round(keep * n_in)
    ys = shim.channel_skip(exe, x.astype(np.float32), w, k, splits=splits)
    w64 = w.astype(np.float64)
    for y in ys:
        for t in range(2):
            r = kept_rows(x[t], k)
            ref = x[t, r].astype(np.float64) @ w64[r]
            sc = np.abs(x[t, r]).astype(np.float64) @ np.abs(w64[r])
            assert (np.abs(y[t] - ref) <= 2e-5 * sc + 1e-7 * (sc.max() if k else 0) + 1e-30).all()
    assert ys[0].tobytes() == ys[1].tobytes()


@pytest.mark.parametrize("order", ["reverse", "random:7"])
def test_the_order_of_the_threads_changes_no_bit(exe, torch, rng, monkeypatch, order):
    """The threads of every block taking turns in another order between barriers (a race on
    shared memory, or a barrier missing, would give other bits): the same outputs and cuts."""
    B = random_buckets(rng, (100, 75), "q8")
    x = random_x(rng, 2, 100, np.float16)
    x2 = random_x(rng, 2, 300)
    w = rng.standard_normal((300, 40)).astype(np.float16)
    wq = pyeffort.quantize_dense_q8(w)

    def run():
        calls = [shim.Call(x, 0.3), shim.Call(x, 1.0)]
        effort = shim.effort_calls(exe, [B], [([0], 3, calls)])[0]
        ys = [r.y[0].tobytes() + r.state[0][3].tobytes() for r in effort]
        ys += [y.tobytes() for y in shim.dense_q8(exe, x2, wq, splits=2, calls=1)]
        ys += [y.tobytes() for y in shim.channel_skip(exe, x2, w, 170, splits=2, calls=1)]
        return ys

    forward = run()
    monkeypatch.setitem(shim.ENV, "CUDA_SIM_ORDER", order)
    assert run() == forward


# ---------------------------------------------------------------- the shim catches faults


@pytest.mark.parametrize(
    "name, report",
    [
        ("divergent_barrier", "returned while others wait in __syncthreads at faults.cu"),
        ("divergent_shuffle", "returned while its warp waits in __shfl_xor_sync at faults.cu"),
        ("split_barrier", "__syncthreads at faults.cu"),
        ("deadlock", "has not finished in 3 s"),
        ("read_past", "heap-buffer-overflow"),
        ("smem_past", "use-after-poison"),
        ("misaligned", "misaligned"),
        # thread block clusters (two blocks each) and distributed shared memory
        ("cluster_exited", "pe_dsm_ld at faults.cu"),
        ("cluster_wait_first", "no pe_cluster_arrive before it"),
        ("cluster_arrive_twice", "a second arrive with no pe_cluster_wait since the one at faults"),
        ("cluster_missing", "has not finished in 3 s"),
        ("cluster_early", "(block 0, thread 0): block 1's shared memory before this thread's"),
        ("cluster_map_static", "is not in this block's dynamic shared memory"),
    ],
)
def test_a_faulty_kernel_fails(exe, name, report):
    err = shim.fault(exe, name)
    assert report in err.stderr, err.stderr[-3000:]
    if name == "deadlock":  # where the stuck block waits: the spin of pe_wait_geq
        assert "last polled unchanged memory at common.cuh" in err.stderr, err.stderr[-3000:]
    if name == "cluster_exited":
        assert "block 1 (rank 1 of this cluster) has exited" in err.stderr, err.stderr[-3000:]
    if name == "cluster_missing":  # block 0 waits at the cluster barrier, block 1 for block 0
        assert "block 0: 0 of 128 threads returned\n    threads 0..127 wait at the cluster " in (
            err.stderr
        ), err.stderr[-3000:]
        assert "last polled unchanged memory at common.cuh" in err.stderr, err.stderr[-3000:]


def cluster_sums(blocks: int, cluster: int) -> list[int]:
    """faults.cu's k_cluster_sum: each block's value, the sum over the blocks of its cluster
    (`cluster` consecutive ones) of 128 threads times blockIdx.x + 1."""
    return [
        128 * sum(range(b - b % cluster + 1, b - b % cluster + cluster + 1)) for b in range(blocks)
    ]


def test_a_cluster_kernel_sums_through_distributed_shared_memory(exe):
    """Every thread adds its blockIdx.x + 1 into rank 0's shared memory (pe_dsm_add through
    pe_cluster_map), reads the sum back after a cluster barrier (pe_dsm_ld): clusters of 4 of 8
    blocks, 3 blocks without the attribute (clusters of one), 16 in one cluster once the kernel
    allows a non-portable size; in every order of the threads the same. Then threads that
    return before the cluster barrier (a block, two warps of the other): it waits only for
    those that have not, and the 64 others pass it twice."""
    want = [0, *cluster_sums(8, 4), 0, *cluster_sums(3, 1), 0, 0, *cluster_sums(16, 16), 0, 64]
    for order in ["forward", "reverse", "random:3"]:
        s = shim.Script()
        s.add("fault", "cluster_sum")
        assert s.run(exe, env={"CUDA_SIM_ORDER": order})[0] == want, order


def test_cluster_launches_the_runtime_refuses(exe):
    """A cluster size that does not divide the grid, 0, 16 without the non-portable attribute,
    32, a cluster that does not divide 3 blocks: cudaErrorInvalidClusterSize (912), no launch; a
    cluster launch that is also cooperative, and the attribute at 2: cudaErrorInvalidValue."""
    s = shim.Script()
    s.add("fault", "cluster_refused")
    assert s.run(exe)[0] == [912, 912, 912, 912, 912, 1, 1]


def test_a_buffer_one_element_short_is_caught(exe, torch, rng):
    """The kernel reads stats[r] for every loaded row: one entry fewer is a read past a buffer."""
    B = pyeffort.build_buckets(rng.standard_normal((64, 37)).astype(np.float16))
    s = shim.Script()
    m = shim.upload(s, B, "m0")
    s.arrays["m0_stats"] = s.arrays["m0_stats"][:-1]
    n_workers = shim.group(s, [m], 2)
    s.add("init")
    shim._add_call(s, "c", [m], n_workers, shim.Call(random_x(rng, 1, 64), 0.3))
    with pytest.raises(shim.RunError) as err:
        s.run(exe)
    assert "heap-buffer-overflow" in err.value.stderr, err.value.stderr[-3000:]


def test_max_clusters(exe):
    """pe_cuda_max_clusters: the simulator's count (one block per multiprocessor) for each
    cluster size and tile width; a size or width the kernel has not: a status."""
    s = shim.Script()
    s.add("init")
    for c, ct in ((1, 32), (8, 64), (16, 256), (17, 64), (8, 48)):
        s.add("max_clusters", c, ct)
    res = subprocess_lines(s, exe)
    assert res == [("status", 0)] + [
        ("status", 0), ("clusters", 132), ("status", 0), ("clusters", 16), ("status", 0),
        ("clusters", 8), ("status", 3), ("clusters", -1), ("status", 3), ("clusters", 0),
    ]  # fmt: skip


def subprocess_lines(s, exe):
    """The driver's (word, number) output lines of script s."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "script")
        with open(script, "w") as f:
            f.write("\n".join(s.lines) + "\n")
        out = subprocess.run([str(exe), d, script], capture_output=True, text=True, check=True,
                             env={**os.environ, **shim.ENV}).stdout  # fmt: skip
    return [(w, int(n)) for w, n in (line.split() for line in out.splitlines())]


def test_cluster_layout_rules():
    """The cluster kernel's sizes (pyeffort.cuda, host only): a cluster of the largest power of
    two up to 16 that keeps tiles * size within the multiprocessors; the tile width that puts
    most blocks in one wave, then pads least, then is widest; an unknown kernel is refused."""
    from pyeffort import cuda

    assert [cuda.cluster_size(t, 132) for t in (1, 7, 8, 9, 12, 33, 66, 67, 200)] == [
        16, 16, 16, 8, 8, 4, 2, 1, 1,
    ]  # fmt: skip
    # 14336 outputs (896 groups): 7 tiles of 128 in clusters of 16; 4096 (256): 8 tiles of 32;
    # 8 groups: one tile of 32 (the least padding)
    assert [cuda._cluster_ct(g, 132) for g in (896, 256, 64, 3584, 8)] == [128, 32, 32, 256, 32]
    # a device that holds only 4 clusters of 16 (its GPCs): 7 tiles take clusters of 8; 896
    # groups then take tiles of 64 (14 tiles of 8 blocks, 7 clusters of 16 no longer in a wave)
    fits = lambda c, ct: 4 if c == 16 else 132 // c  # noqa: E731
    assert cuda.cluster_size(7, 132, lambda c: fits(c, 128)) == 8
    assert cuda._cluster_ct(896, 132, fits) == 64
    with pytest.raises(ValueError, match="kernel must be one of"):
        cuda.set_kernel("fast")
    with pytest.raises(ValueError, match="tolerance must lie in"):
        cuda.set_tolerance(0.05)
    # the environment's defaults, checked the same way
    assert cuda._env_settings({}) == ("coop", 0.0)
    env = {"PYEFFORT_CUDA_KERNEL": "cluster", "PYEFFORT_CUDA_TOLERANCE": "0.02"}
    assert cuda._env_settings(env) == ("cluster", 0.02)
    for bad, what in (({"PYEFFORT_CUDA_KERNEL": "clustr"}, "PYEFFORT_CUDA_KERNEL"),
                      ({"PYEFFORT_CUDA_TOLERANCE": "0.1"}, "PYEFFORT_CUDA_TOLERANCE"),
                      ({"PYEFFORT_CUDA_TOLERANCE": "two"}, "PYEFFORT_CUDA_TOLERANCE")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            cuda._env_settings(bad)
