"""Every CPU kernel set this machine runs (the SIMD sets it has, the lower ones forced too, and
the portable scalar ones) against reference.py, for fp16 and int8 (q8) bucket values: the same
rows dispatched, mults and bytes, results within float32 rounding (2e-6 of the largest output:
the sums run in another order, and q8 kernels round x * scale once per record); each SIMD
kernel bit for bit against the scalar kernel of the layout it reads; thread counts give
bitwise identical results."""

import os
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

import pyeffort
from pyeffort import _core, reference
from pyeffort.errors import DTypeError, FormatError, ShapeError

KERNELS = _core.available_kernels()
PORTABLE = ["scalar", "scalar-tiered", "scalar-permuted"]  # every machine runs these
SHAPES = [(333, 517), (64, 40), (96, 1100), (5, 17), (40, 3), (17, 257), (300, 4100), (1, 33)]
EFFORTS = [0.0, 0.03, 0.1, 0.25, 0.5, 0.77, 1.0]


@pytest.fixture(params=KERNELS)
def kernel(request):
    previous = _core.kernel_name()
    _core.use_kernel(request.param)
    yield request.param
    _core.use_kernel(previous)


@pytest.fixture(params=["f16", "q8"])
def kind(request):
    """The value kind: fp16 bucket values, or int8 with their scales (reference.quantise_q8)."""
    return request.param


@pytest.fixture
def threads():
    previous = _core.num_threads()
    yield
    _core.set_num_threads(previous)


def activations(rng, n_tokens, n_in):
    """Heavy-tailed rows with exact zeros and repeated values (ties in the cutoff)."""
    x = rng.standard_normal((n_tokens, n_in)) * rng.gamma(1.0, size=n_in)
    x[:, ::7] = 0.0
    x[:, 1::11] = 0.5
    return x.astype(np.float32)


def buckets_of(rng, shape, loaded=1.0):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    b = pyeffort.build_buckets(w)
    n_rows = round(loaded * b.n_rows)
    if n_rows < b.n_rows:  # a partial load keeps a row prefix
        b = pyeffort.Buckets(b.values[:n_rows], b.positions[:n_rows], b.stats, b.order, b.n_out)
    return w, b


class Mat(NamedTuple):
    """A matrix's canonical arrays as _core and reference take them (scales: q8 only)."""

    values: np.ndarray
    positions: np.ndarray
    stats: np.ndarray
    order: np.ndarray
    n_out: int
    scales: np.ndarray | None = None

    @property
    def arrays(self):
        return (self.values, self.positions, self.stats, self.order, self.n_out)

    @property
    def n_in(self):
        return self.stats.shape[1]


def matrix_of(rng, shape, kind="f16", loaded=1.0, w=None):
    """Random weights (or w) in bucket form, fp16 or q8 values, a row prefix (and for q8 the
    scale prefix it reads) when loaded < 1, as a partial load keeps."""
    if w is None:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    v, p, s, o = reference.build(w)
    sc = None
    if kind == "q8":
        v, sc = reference.quantise_q8(v, o)
    n_rows = round(loaded * v.shape[0])
    if n_rows < v.shape[0]:
        v, p = v[:n_rows], p[:n_rows]
        sc = None if sc is None else sc[: reference.scale_rows(n_rows, shape[0])]
    return Mat(v, p, s, o, shape[1], sc)


def with_stats(m, stats):
    return m._replace(stats=stats)


def run_both(x, b, effort):
    """x through b (a Buckets or a Mat) in the reference and the C core."""
    ref = np.zeros((x.shape[0], b.n_out), np.float32)
    got = np.full_like(ref, np.nan)
    args = (b.values, b.positions, b.stats, b.order, b.n_out, effort)
    scales = getattr(b, "scales", None)
    want = reference.bucketmul(x, *args, ref, scales=scales)
    have = _core.bucketmul(x, *args, got, scales=scales)
    return ref, got, want, have


def close(got, ref):
    scale = np.abs(ref).max() + 1e-30
    return float(np.abs(got.astype(np.float64) - ref).max() / scale)


def test_the_machine_runs_scalar_and_names_its_kernel():
    assert KERNELS[-3:] == PORTABLE
    assert _core.kernel_name() in KERNELS
    info = pyeffort.runtime_info()
    assert info["kernel"] in KERNELS or info["backend"] == "numpy"
    if os.uname().machine == "x86_64" and "avx512" in KERNELS:
        assert "avx512f" in _core.cpu_features()


def test_the_tiered_kernel_leads_where_the_cpu_has_vbmi2():
    if "avx512vbmi2" in _core.cpu_features().split():
        assert KERNELS[0] == "avx512vbmi2"
    else:
        assert "avx512vbmi2" not in KERNELS


def test_every_lower_kernel_set_runs_here_too():
    """The tests run every set this machine has, the lower ones forced: an AVX-512 machine also
    runs avx2 and the portable sets, so it tests what AVX2-only users run (unless
    PYEFFORT_DISABLE_CPU_FEATURES drops them: then the features named are left out)."""
    have = set(_core.cpu_features().split())
    if os.environ.get("PYEFFORT_DISABLE_CPU_FEATURES"):
        pytest.skip("PYEFFORT_DISABLE_CPU_FEATURES is set")
    if {"avx2", "fma", "f16c"} <= have:
        assert "avx2" in KERNELS
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have:
        assert KERNELS.index("avx512") < KERNELS.index("avx2")
    if os.uname().machine == "aarch64":
        assert KERNELS[0] == "neon"
    for name in KERNELS:  # each one is really used when forced
        _core.use_kernel(name)
        assert _core.kernel_name() == name
    _core.use_kernel(KERNELS[0])


@pytest.mark.parametrize("scale", [3.0, 1.0000001])
def test_statistics_that_rise_with_rank_still_match(kernel, kind, rng, scale):
    """A file may hold statistics that rise with rank (then a token dispatches a non-prefix of
    ranks): every kernel takes any rank set, through its own copy."""
    b = matrix_of(rng, (70, 300), kind)
    stats = b.stats.copy()
    stats[1:4] *= scale  # ranks 1..3 above rank 0 for many inputs
    b = with_stats(b, stats)
    assert copy_of(b) == COPY[kind][kernel]  # every copy holds them
    x = activations(rng, 2, 70)
    for e in [0.05, 0.3, 0.7]:
        ref, got, want, have = run_both(x, b, e)
        assert have == want, (kernel, e)
        assert close(got, ref) <= 2e-6, (kernel, e)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError):
        _core.use_kernel("sse9")


@pytest.mark.parametrize("shape", SHAPES)
def test_bucketmul_matches_reference(kernel, kind, rng, shape):
    """Odd sizes (n_out % 64 != 0, n_out < 16, n_in = 1), every effort: the same rows, mults
    and bytes (q8: int8 rows and the scales of each dispatched tier), results within 2e-6."""
    b = matrix_of(rng, shape, kind)
    x = activations(rng, 3, shape[0])
    for e in EFFORTS:
        ref, got, want, have = run_both(x, b, e)
        assert have == want, (kernel, e)  # the same rows: same mults and bytes
        assert close(got, ref) <= 2e-6, (kernel, e)


# the in-memory copy each set reads, by value kind (q8 has one copy, the tiered one, on every
# set but the scalar spec), and the portable set whose kernel is the spec of that set's kernel,
# bit for bit
COPY = {
    "f16": {
        "avx512vbmi2": "tiered",
        "avx512": "permuted",
        "avx2": "permuted",
        "neon": "permuted",
        "scalar": "canonical",
        "scalar-tiered": "tiered",
        "scalar-permuted": "permuted",
    },
    "q8": {k: "tiered" for k in ["avx512vbmi2", "avx512", "avx2", "neon", "scalar-tiered",
                                 "scalar-permuted"]} | {"scalar": "canonical"},  # fmt: skip
}
SPEC = {
    "f16": {"avx512vbmi2": "scalar-tiered", "avx512": "scalar-permuted", "avx2": "scalar-permuted"},
    "q8": {"avx512vbmi2": "scalar-tiered", "avx512": "scalar-tiered", "avx2": "scalar-tiered"},
}


def copy_of(b):
    return _core.copy_kind(*b.arrays, scales=b.scales)


def test_each_kernel_set_reads_its_copy(kernel, kind, rng):
    """The repacked kernels really run: AVX-512 VBMI2 reads the tiered copy, AVX2 the permuted
    one for fp16 values and the tiered one for q8 (each built for the kernel set in use),
    scalar the canonical rows."""
    b = matrix_of(rng, (40, 100), kind)
    assert copy_of(b) == COPY[kind][kernel]
    part = matrix_of(rng, (40, 100), kind, loaded=0.6)  # partial loads keep their copy
    assert copy_of(part) == COPY[kind][kernel]


def rising(b):
    """b with statistics that rise with rank for many inputs (then a token may dispatch any set
    of an input's ranks, not a prefix)."""
    stats = b.stats.copy()
    stats[1:4] *= 3.0
    return with_stats(b, stats)


@pytest.mark.parametrize("shape", [(333, 517), (5, 17), (300, 4100), (70, 300), (1, 33)])
def test_simd_kernels_match_their_layouts_scalar_kernel_bit_for_bit(kernel, kind, rng, shape):
    """Each x86 SIMD kernel gives the bits of the scalar kernel of the layout it reads (the
    same operations per output, in the same order), on every class of item: whole tiers,
    prefixes, any rank set (rising statistics), partial loads (q8: with their scale prefix)."""
    if kernel not in SPEC[kind]:
        pytest.skip(f"{kernel} has no SIMD spec to match bit for bit")
    full = matrix_of(rng, shape, kind)
    part = matrix_of(rng, shape, kind, loaded=0.45)
    x = activations(rng, 3, shape[0])
    for b in (full, part, rising(full)):
        for e in [0.0, 0.02, 0.2, 0.3, 0.5, 0.9, 1.0]:
            got = np.full((3, b.n_out), np.nan, np.float32)
            want = np.full_like(got, np.nan)
            have = _core.bucketmul(x, *b.arrays, e, got, scales=b.scales)
            _core.use_kernel(SPEC[kind][kernel])
            spec = _core.bucketmul(x, *b.arrays, e, want, scales=b.scales)
            _core.use_kernel(kernel)
            assert have == spec and np.array_equal(got, want), (kernel, e)


def repeated(positions, order):
    """positions with rank 1 of every input at rank 0's position in group 0."""
    positions, n_in = positions.copy(), order.shape[1]
    for j in range(n_in):
        r0 = int(np.nonzero(order[0] == j)[0][0])
        r1 = n_in + int(np.nonzero(order[1] == j)[0][0])
        positions[r1, 0] = (positions[r1, 0] & 0xF0) | (positions[r0, 0] & 0x0F)
    return positions


def damaged(rng, how):
    """The arrays of a matrix (values, positions, stats, order, n_out) that a file could hold but
    pyeffort.build never makes: an inf value, or two ranks at one position of a group."""
    _, b = buckets_of(rng, (60, 80))
    values, positions = b.values.copy(), b.positions
    if how == "inf":
        values[-5:, 1] = np.inf  # rank 15 of five inputs, group 1
    else:
        positions = repeated(positions, b.order)
    return values, positions, b.stats, b.order, b.n_out


def damaged_q8(rng, how):
    """A q8 matrix (Mat) that a file could hold but quantise_q8 never makes: an int8 value of
    -128 (outside the symmetric range), a scale that is inf, NaN or negative, or two ranks at
    one position of a group."""
    m = matrix_of(rng, (60, 80), "q8")
    values, scales = m.values.copy(), m.scales.copy()
    if how == "-128":
        values[-5:, 1] = -128  # rank 15 of five inputs, group 1
    elif how == "repeated":
        return m._replace(positions=repeated(m.positions, m.order))
    else:  # tier 3 (ranks 12..15) of five inputs, chunk 0
        scales[-5:, 0] = {"inf": np.inf, "nan": np.nan, "negative": -0.5}[how]
    return m._replace(values=values, scales=scales)


@pytest.mark.parametrize("how", ["-128", "inf", "nan", "negative", "repeated"])
def test_damaged_q8_matrices_are_refused_on_every_set(kernel, rng, how):
    """A damaged q8 matrix (an int8 value of -128, a scale not finite or negative, a position
    repeated in a group) gives FormatError on every kernel set, at any effort, alone or in a
    group; a scale of -0 is 0 and runs."""
    m = damaged_q8(rng, how)
    x = activations(rng, 2, 60)
    for e in [0.0, 0.3, 1.0]:
        with pytest.raises(FormatError, match="damaged"):
            _core.bucketmul(x, *m.arrays, e, np.empty((2, 80), np.float32), scales=m.scales)
    with pytest.raises(FormatError):
        _core.bucketmul_group(x[0], [(*m.arrays, m.scales)], [0.5], [np.empty(80, np.float32)])
    zero = matrix_of(rng, (60, 80), "q8", w=np.zeros((60, 80), np.float16))
    neg_zero = zero._replace(scales=-zero.scales)  # every scale -0
    assert (neg_zero.scales.view(np.uint16) == 0x8000).all()
    ref, got, want, have = run_both(x, neg_zero, 1.0)
    assert have == want and not got.any()


def test_q8_arrays_are_checked_before_c(rng):
    """int8 values without their scales, scales of the wrong shape or dtype, and fp16 values
    with scales are refused with a message, never read."""
    m = matrix_of(rng, (30, 70), "q8", loaded=0.5)
    f = matrix_of(rng, (30, 70))
    x = activations(rng, 1, 30)
    out = np.empty((1, 70), np.float32)
    with pytest.raises(DTypeError, match="scales"):
        _core.bucketmul(x, *m.arrays, 0.5, out)
    with pytest.raises(DTypeError, match="scales"):
        _core.bucketmul(x, *m.arrays, 0.5, out, scales=m.scales.astype(np.float32))
    with pytest.raises(ShapeError, match="scales"):
        _core.bucketmul(x, *m.arrays, 0.5, out, scales=m.scales[:-1])  # one row short
    with pytest.raises(ShapeError, match="scales"):
        _core.bucketmul(x, *m.arrays, 0.5, out, scales=np.ascontiguousarray(m.scales[:, :-1]))
    with pytest.raises(DTypeError, match="no scales"):
        _core.bucketmul(x, *f.arrays, 0.5, out, scales=m.scales)


def test_a_damaged_scale_past_the_loaded_prefix_is_never_read(kernel, rng):
    """Only the scale rows of the loaded tiers count (reference.scale_rows): an inf scale in
    a row past them is never read."""
    m = damaged_q8(rng, "inf")  # tier 3's scales
    loaded = m._replace(values=m.values[: 8 * 60], positions=m.positions[: 8 * 60])
    x = activations(rng, 2, 60)
    ref, got, want, have = run_both(x, loaded, 1.0)
    assert have == want and close(got, ref) <= 2e-6


@pytest.mark.parametrize("how", ["inf", "repeated"])
def test_damaged_matrices_are_refused_on_every_set(kernel, rng, how):
    """A damaged matrix (a value that is not finite, or a position repeated in a group: no fast
    layout can hold it) gives FormatError on every kernel set, at any effort: never a result
    that depends on the set."""
    arrays = damaged(rng, how)
    x = activations(rng, 2, 60)
    for e in [0.0, 0.3, 1.0]:
        with pytest.raises(FormatError, match="damaged"):
            _core.bucketmul(x, *arrays, e, np.empty((2, 80), np.float32))
    with pytest.raises(FormatError):
        _core.bucketmul_group(x[0], [(*arrays, None)], [0.5], [np.empty(80, np.float32)])


def test_a_damaged_partial_load_is_refused_only_where_loaded(kernel, rng):
    """Only the loaded rows count: an inf in a rank past the loaded prefix is never read."""
    values, positions, stats, order, n_out = damaged(rng, "inf")
    n_rows = 8 * 60  # ranks 0..7 loaded; the inf lies in rank 15
    x = activations(rng, 2, 60)
    got, ref = np.empty((2, n_out), np.float32), np.empty((2, n_out), np.float32)
    args = (values[:n_rows], positions[:n_rows], stats, order, n_out, 1.0)
    assert _core.bucketmul(x, *args, got) == reference.bucketmul(x, *args, ref)
    assert close(got, ref) <= 2e-6


@pytest.mark.parametrize("shape", [(40, 3), (17, 35), (64, 64)])
def test_full_effort_without_zero_inputs(kernel, kind, rng, shape):
    """No x_i = 0 (so the cutoff is not 0): at effort 1 the padding rows of a last group
    narrower than 16 (no multiplications) stay out where the reference leaves them out."""
    b = matrix_of(rng, shape, kind)
    x = (rng.standard_normal((2, shape[0])) + 3.0).astype(np.float32)
    for e in [0.999, 1.0]:
        ref, got, want, have = run_both(x, b, e)
        assert have == want, (kernel, e)
        assert close(got, ref) <= 2e-6, (kernel, e)


@pytest.mark.parametrize("loaded", [0.06, 0.3, 0.5001, 0.77])
def test_partial_loads(kernel, kind, rng, loaded):
    """A prefix of the rows (q8: and the prefix of scale rows it reads), every effort."""
    b = matrix_of(rng, (130, 300), kind, loaded)
    x = activations(rng, 2, 130)
    for e in [0.0, 0.02, 0.05, 0.2, 0.3, 0.4, 1.0]:  # past the loaded fraction: all loaded
        ref, got, want, have = run_both(x, b, e)
        assert have == want
        assert close(got, ref) <= 2e-6


def test_thread_counts_give_identical_bits(kernel, kind, threads, rng):
    b = matrix_of(rng, (600, 3000), kind)
    w = (rng.standard_normal((1500, 3000)) * 0.05).astype(np.float16)  # 9 MB: threaded
    x = activations(rng, 2, 600)
    xd = activations(rng, 2, 1500)
    results = []
    for n in [1, 2, 3, 7]:
        _core.set_num_threads(n)
        y = np.empty((2, 3000), np.float32)
        y1, d, r = np.empty_like(y), np.empty_like(y), np.empty_like(y)
        _core.bucketmul(x, *b.arrays, 0.3, y, scales=b.scales)  # 1-2 MB: two parts
        _core.bucketmul(x, *b.arrays, 1.0, y1, scales=b.scales)  # 3-5 MB: 6-8 parts
        _core.dense_f16(xd, w, d)
        _core.dense_rows_f16(xd, w, np.arange(0, 1500, 2, dtype=np.int32), r)
        results.append((y, y1, d, r))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(333, 517), (8, 5), (70, 1000), (1, 33)])
def test_dense_matches_reference(kernel, rng, shape):
    w = (rng.standard_normal(shape)).astype(np.float16)
    x = activations(rng, 2, shape[0])
    got, ref = np.empty((2, shape[1]), np.float32), np.empty((2, shape[1]))
    _core.dense_f16(x, w, got)
    reference.dense_f16(x, w, ref)
    assert close(got, ref) <= 2e-6


@pytest.mark.parametrize("shape", [(333, 517), (8, 5), (70, 1000)])
def test_dense_rows_matches_reference(kernel, rng, shape):
    w = (rng.standard_normal(shape)).astype(np.float16)
    x = activations(rng, 3, shape[0])
    for rows in [
        np.arange(shape[0], dtype=np.int32),
        np.sort(rng.choice(shape[0], shape[0] // 3, replace=False)).astype(np.int32),
        rng.permutation(shape[0])[: shape[0] // 2].astype(np.int32),  # any order
        np.zeros(0, np.int32),
    ]:
        got = np.full((3, shape[1]), np.nan, np.float32)
        ref = np.empty((3, shape[1]))
        _core.dense_rows_f16(x, w, rows, got)
        reference.dense_rows_f16(x, w, rows, ref)
        assert close(got, ref) <= 2e-6 or not ref.any() and not got.any()


def test_dense_rows_rejects_bad_rows(rng):
    w = np.ones((10, 4), np.float16)
    x = np.ones((1, 10), np.float32)
    out = np.empty((1, 4), np.float32)
    for impl in (_core.dense_rows_f16, reference.dense_rows_f16):
        with pytest.raises(ShapeError):
            impl(x, w, np.array([0, 10], np.int32), out)
        with pytest.raises(ShapeError):
            impl(x, w, np.array([-1], np.int32), out)


def test_packed_copy_follows_its_arrays(rng):
    """The packed copy is cached per values array and rebuilt for new arrays."""
    _, b1 = buckets_of(rng, (50, 70))
    _, b2 = buckets_of(rng, (50, 70))
    x = activations(rng, 1, 50)
    for b in (b1, b2, b1):
        ref, got, _, _ = run_both(x, b, 1.0)
        assert close(got, ref) <= 2e-6


KERNELS_CODE = "from pyeffort import _core; print(_core.available_kernels(), _core.kernel_name())"


def with_disabled(features, *args):
    """A python process with PYEFFORT_DISABLE_CPU_FEATURES=features, running args."""
    env = dict(os.environ, PYEFFORT_DISABLE_CPU_FEATURES=features)
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, check=False, timeout=600
    )


def test_disable_cpu_features_forces_a_lower_set():
    out = with_disabled("avx512,avx2,neon", "-c", KERNELS_CODE)
    assert out.stdout.strip() == f"{PORTABLE} scalar", out.stderr
    if "avx2" in KERNELS:
        out = with_disabled("avx512", "-c", KERNELS_CODE)
        assert out.stdout.strip() == f"{['avx2'] + PORTABLE} avx2", out.stderr
    if "avx512vbmi2" in KERNELS:
        out = with_disabled("avx512vbmi2", "-c", KERNELS_CODE)
        assert out.stdout.strip() == f"{['avx512', 'avx2'] + PORTABLE} avx512", out.stderr


@pytest.mark.parametrize("features", ["avx512", "avx2"])
def test_kernel_tests_pass_with_features_disabled(features):
    """A few of these tests in a process where PYEFFORT_DISABLE_CPU_FEATURES drops the
    AVX-512 (or every x86 SIMD) set: the switch works, and what is left still passes."""
    if features not in KERNELS and not any(k.startswith(features) for k in KERNELS):
        pytest.skip(f"this machine runs no {features} set")
    out = with_disabled(
        features,
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "bucketmul_matches_reference and shape0 or damaged_matrices or disable_cpu_features",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = out.stdout
    assert "[scalar-" in ran and "[avx512" not in ran  # the dropped sets are not there
    assert ("[avx2-" in ran) == (features == "avx512")


def test_concurrent_callers_get_the_same_results(kernel, threads, rng):
    """Python threads calling at once (the pool runs one job, the others run inline)."""
    from concurrent.futures import ThreadPoolExecutor

    _, b = buckets_of(rng, (300, 900))
    xs = [activations(rng, 1, 300) for _ in range(8)]
    _core.set_num_threads(2)

    def one(x):
        y = np.empty((1, 900), np.float32)
        _core.bucketmul(x, b.values, b.positions, b.stats, b.order, b.n_out, 0.4, y)
        return y

    alone = [one(x) for x in xs]
    for _ in range(5):
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(one, xs))
        assert all(np.array_equal(a, t) for a, t in zip(alone, together))


def test_thread_count_changed_during_calls_changes_no_result(threads, rng):
    """Issue 18.2: a call reads the thread count once and sizes and runs its job with it. Python
    threads call prefetch, matmul_group and matmul at different efforts while another one sets the
    thread count to 1 to 4 in turn: every result has the bits of a call alone. (Before, a
    group sized its kernel chunks from one read and each matrix's job from a later one: garbage
    in the output ranges no chunk covered when the reads gave 1-3 and then 4, whose jobs
    split into 2 column ranges instead of 1; a few of the 1280 calls, every run.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    mats = [buckets_of(rng, (2048, n))[1] for n in (256, 512, 384)]  # long searches
    xs = [activations(rng, 1, 2048)[0] for _ in range(8)]
    efforts = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 0.3]

    def both(x, e):
        pyeffort.prefetch(mats[::-1])  # prefetch requests race the calls too: no effect on bits
        return pyeffort.matmul_group(x, mats, [e, e / 2, 1 - e]), pyeffort.matmul(x, mats[2], e)

    _core.set_num_threads(1)
    alone = [both(x, e) for x, e in zip(xs, efforts)]
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for n in (1, 4, 2, 4, 3, 4):
                _core.set_num_threads(n)

    def calls(k):
        bad = 0
        for i in range(80):  # another x each time: an output left unwritten shows (a fresh
            j = (k + i) % 8  # array may reuse the memory of the last call's result)
            group, single = both(xs[j], efforts[j])
            bad += not all(np.array_equal(a, b) for a, b in zip(group, alone[j][0]))
            bad += not np.array_equal(single, alone[j][1])
        return bad

    flipper = threading.Thread(target=flip)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the flipper runs while the callers are in C
    flipper.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            bad = sum(pool.map(calls, range(8)))
    finally:
        stop.set()
        flipper.join()
        sys.setswitchinterval(interval)
    assert bad == 0, f"{bad} of {8 * 80 * 2} calls differ from the call alone"


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4])
def test_group_equals_separate_calls(kernel, threads, rng, n_threads):
    """matmul_group: the same bits, mults and bytes as one matmul per matrix, for every kernel
    set, thread count, odd size, partial load and per-matrix effort (0 and 1 included)."""
    _core.set_num_threads(n_threads)
    n_in = 577
    mats = [
        buckets_of(rng, (n_in, n), loaded)[1]
        for n, loaded in [(600, 1.0), (17, 1.0), (1030, 0.4), (64, 0.7)]
    ]
    for efforts in ([0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.77, 0.05], [1.0, 1.0, 1.0, 1.0]):
        x = activations(rng, 1, n_in)[0]
        for k in (1, 2, 4):
            ys, infos = pyeffort.matmul_group(x, mats[:k], efforts[:k], return_info=True)
            for y, info, b, e in zip(ys, infos, mats, efforts):
                y1, info1 = pyeffort.matmul(x, b, e, return_info=True)
                assert np.array_equal(y, y1) and info == info1


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_a_group_of_f16_and_q8_matrices_equals_separate_calls(kernel, threads, rng, n_threads):
    """bucketmul_group with fp16 and q8 members mixed (6-tuples; odd sizes, partial loads,
    efforts 0 and 1): each member's bits, mults and bytes are those of its call alone."""
    _core.set_num_threads(n_threads)
    n_in = 300
    mats = [
        matrix_of(rng, (n_in, 600), "q8"),
        matrix_of(rng, (n_in, 17), "f16"),
        matrix_of(rng, (n_in, 1030), "q8", 0.4),
        matrix_of(rng, (n_in, 64), "f16", 0.7),
    ]
    for efforts in ([0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.77, 0.02], [1.0, 1.0, 1.0, 1.0]):
        x = activations(rng, 1, n_in)[0]
        outs = [np.full(m.n_out, np.nan, np.float32) for m in mats]
        infos = _core.bucketmul_group(x, [(*m.arrays, m.scales) for m in mats], efforts, outs)
        for y, info, m, e in zip(outs, infos, mats, efforts):
            alone = np.full((1, m.n_out), np.nan, np.float32)
            assert _core.bucketmul(x[None], *m.arrays, e, alone, scales=m.scales) == info
            assert np.array_equal(alone[0], y)


def test_q8_bytes_are_int8_rows_and_the_scales_of_each_dispatched_tier(rng):
    """Bytes per multiplication at effort 1 of a q8 matrix: 1 (int8) + 0.5 (position) + 2 / 16
    (a scale per 16 values) = 1.625, against 2.5 for fp16 values (n_out a multiple of 64)."""
    f, q = matrix_of(rng, (64, 256)), matrix_of(rng, (64, 256), "q8")
    x = np.ones((1, 64), np.float32)
    out = np.empty((1, 256), np.float32)
    mults, nbytes = _core.bucketmul(x, *q.arrays, 1.0, out, scales=q.scales)
    assert mults == 64 * 256 and nbytes == 1.625 * mults
    mults, nbytes = _core.bucketmul(x, *f.arrays, 1.0, out)
    assert nbytes == 2.5 * mults


@pytest.mark.parametrize("n_out", [40, 600])
def test_search_split_over_threads_selects_the_same_rows(kernel, threads, rng, n_out):
    """A matrix of 2 x 1024+ inputs has the first pass of its cutoff search split over the
    threads (and its candidates taken as runs of ranks): the same rows, mults and bits as the
    reference, for any thread count (a new x each call, so a key the split missed would keep
    the previous call's value)."""
    _, b = buckets_of(rng, (2100, n_out))
    xs = [activations(rng, 1, 2100) for _ in range(8)]
    by_threads = []
    for n in [1, 2, 3]:
        _core.set_num_threads(n)
        outs = []
        for x, e in zip(xs, [0.02, 0.3, 0.9, 0.5, 0.1, 0.7, 0.25, 0.4]):
            ref, got, want, have = run_both(x, b, e)
            assert have == want
            assert close(got, ref) <= 2e-6
            outs.append(got)
        by_threads.append(outs)
    for other in by_threads[1:]:
        assert all(np.array_equal(a, c) for a, c in zip(by_threads[0], other))


def hard_activations(case, rng, n_in):
    """Rows whose cutoff keys tie in long runs, span the float range, or are denormal."""
    if case == "all_equal":
        return np.ones((1, n_in), np.float32)
    if case == "two_values":
        return rng.choice([1.0, -2.0], size=(1, n_in)).astype(np.float32)
    if case == "wide":
        return (rng.choice([-1, 1], n_in) * 10.0 ** rng.uniform(-30, 30, n_in))[None].astype(
            np.float32
        )
    if case == "denormal":
        return (rng.standard_normal((1, n_in)) * 1e-38).astype(np.float32)
    x = np.zeros((1, n_in), np.float32)  # "sparse": three inputs carry everything
    x[0, rng.choice(n_in, 3, replace=False)] = [3.0, -0.5, 1e-3]
    return x


@pytest.mark.parametrize("case", ["all_equal", "two_values", "wide", "denormal", "sparse"])
@pytest.mark.parametrize("shape", [(300, 517), (40, 3), (2100, 33)])
def test_cutoff_search_on_hard_keys(kernel, rng, case, shape):
    """The cutoff search (probing below 2048 inputs, histograms above) dispatches the rows the
    reference does where keys tie in long runs, span the float range or are denormal, also for
    equal weight magnitudes (every statistic of a rank the same)."""
    w = np.where(rng.random(shape) < 0.5, -0.01, 0.01).astype(np.float16)
    if case in ("wide", "sparse"):
        w = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = hard_activations(case, rng, shape[0])
    for e in [0.004, 0.1, 0.33, 0.5, 0.9, 0.999]:
        ref, got, want, have = run_both(x, b, e)
        assert have == want, (case, e)
        assert close(got, ref) <= 2e-6


def test_prefetch_changes_nothing(kernel, threads, rng):
    """pyeffort.prefetch (an idle pool thread reads the matrix's copy) leaves results alone."""
    _core.set_num_threads(2)
    x = activations(rng, 1, 256)[0]
    _, keep = buckets_of(rng, (256, 1500))
    want = pyeffort.matmul(x, keep, 0.4)
    for _ in range(20):
        _, b = buckets_of(rng, (256, 1500))
        pyeffort.matmul(x, b, 0.4)  # builds its copy (and starts the pool)
        pyeffort.prefetch(b)
        del b
        pyeffort.prefetch(keep)
        assert np.array_equal(pyeffort.matmul(x, keep, 0.4), want)
        _, b = buckets_of(rng, (256, 700))
        pyeffort.matmul(x, b, 0.4)
        pyeffort.prefetch([keep, b])  # statistics of both, then both copies
        del b
        assert np.array_equal(pyeffort.matmul(x, keep, 0.4), want)
    with pytest.raises(pyeffort.errors.DTypeError, match="Buckets"):
        pyeffort.prefetch(np.ones((4, 4), np.float16))
    with pytest.raises(pyeffort.errors.DTypeError, match="ndarray"):
        pyeffort.prefetch([keep, np.ones((4, 4), np.float16)])
    with pytest.raises(ValueError, match="at most 8"):
        pyeffort.prefetch([keep] * 9)


FREED_WHILE_READ = """
import numpy as np, pyeffort
pyeffort.set_num_threads(2)
rng = np.random.default_rng(0)
w = (rng.standard_normal((4096, 4096)) * 0.05).astype(np.float16)
x = rng.standard_normal(4096).astype(np.float32)
small = pyeffort.build_buckets(w[:64])
pyeffort.matmul(x[:64], small, 0.4)
for k in range(4):
    b = pyeffort.build_buckets(w)
    pyeffort.matmul(x, b, 0.4)
    # a worker starts reading the 40 MB copy (its own mapping), alone or after another's ...
    pyeffort.prefetch(b if k % 2 else [small, b])
    del b  # ... which is freed at once: the free must wait for the reader
print("ok")
"""


def test_a_matrix_freed_while_prefetched_is_not_read_after():
    """The free waits for a reader of the matrix (without the wait the reader could touch
    unmapped pages); matrices are freed while read, alone or after another's statistics. The
    reader stops within 4 KiB once asked, so the race is narrow: this run rarely catches it."""
    out = subprocess.run(
        [sys.executable, "-c", FREED_WHILE_READ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
