"""The output-weighted row statistic: build_buckets(W, out_weight=a) (stat rms_out_weighted).

Ranks inside each group follow abs(fp16(a_j * w_ij)), each row's statistic is the RMS of those
weighted values, the stored values are the true weights. The compiled build runs on the weighted
matrix and the true values are taken at the positions it chose: the same buckets as the numpy
reference, at every size.
"""

import numpy as np
import pytest

import pyeffort
from pyeffort import FormatError, errors, fileformat, reference
from pyeffort.buckets import STAT, STAT_OUT_WEIGHTED


def weights(rng, n_out):
    a = np.exp(1.5 * rng.standard_normal(n_out)).astype(np.float32)
    a[rng.random(n_out) < 0.1] = 0.0  # single outputs that do not matter at all
    a[0] = 1.0
    return a


@pytest.mark.parametrize("n_in", [1, 2, 17, 33])
@pytest.mark.parametrize("n_out", [1, 3, 15, 16, 17, 31, 100])
def test_build_matches_reference_at_any_size(backend, rng, n_in, n_out):
    w = rng.standard_normal((n_in, n_out)).astype(np.float16)
    w[0, : min(n_out, 5)] = 0.5  # ties
    a = weights(rng, n_out)
    b = pyeffort.build_buckets(w, out_weight=a)
    assert b.stat == STAT_OUT_WEIGHTED
    for got, ref in zip((b.values, b.positions, b.stats, b.order), reference.build(w, a)):
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(b.to_dense(), w)  # the true weights, every one once
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    for e in (0.0, 0.3, 1.0):
        y = pyeffort.matmul(x, b, e)
        r = np.empty_like(y)
        reference.bucketmul(x, b.values, b.positions, b.stats, b.order, n_out, e, r)
        np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5 * np.abs(r).max() + 1e-30)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(pyeffort.matmul(x, b, 1.0), exact, rtol=1e-4, atol=1e-4)


def test_ranks_and_stats_follow_the_weighted_values(rng):
    n_in, n_out = 40, 48
    w = rng.standard_normal((n_in, n_out)).astype(np.float16)
    a = weights(rng, n_out)
    values, positions, stats, order = reference.build(w, a)
    g = n_out // 16
    we = (w.astype(np.float32) * a).astype(np.float16).astype(np.float64)
    pos = reference.unpack_nibbles(positions, g).astype(np.int64)
    cols = 16 * np.arange(g)[None, :] + pos
    inputs = np.repeat(order.ravel()[:, None], g, axis=1)
    np.testing.assert_array_equal(values, w[inputs, cols])
    wv = np.abs(we[inputs, cols]).reshape(16, n_in, g)  # rows in file order
    rms = np.sqrt((wv**2).mean(-1)).astype(np.float32)
    np.testing.assert_array_equal(stats, rms)
    by_input = np.empty_like(wv)
    by_input[np.arange(16)[:, None], order] = wv
    assert (np.diff(by_input, axis=0) <= 0).all()  # rank k+1 never outweighs rank k
    plain = reference.build(w)
    assert not np.array_equal(plain[1], positions)  # the weighting changed the ranks


def test_unit_weights_give_the_plain_buckets(backend, rng):
    w = rng.standard_normal((50, 70)).astype(np.float16)
    b = pyeffort.build_buckets(w, out_weight=np.ones(70))
    p = pyeffort.build_buckets(w)
    assert (b.stat, p.stat) == (STAT_OUT_WEIGHTED, STAT)
    for k in ("values", "positions", "stats", "order"):
        np.testing.assert_array_equal(getattr(b, k), getattr(p, k))


def test_weighted_build_lowers_the_weighted_error(rng):
    """What the statistic is for: with outputs of unequal weight, the error that counts,
    sum_j a_j^2 (y_j - exact_j)^2, is smaller than with the plain build at equal effort."""
    w = rng.standard_normal((256, 192)).astype(np.float16)
    a = np.exp(1.5 * rng.standard_normal(192)).astype(np.float32)
    a /= a.mean()
    x = rng.standard_normal((64, 256)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bw, bp = pyeffort.build_buckets(w, a), pyeffort.build_buckets(w)
    for e in (0.15, 0.3, 0.5):
        yw, iw = pyeffort.matmul(x, bw, e, return_info=True)
        yp, ip = pyeffort.matmul(x, bp, e, return_info=True)
        assert iw.mults == ip.mults  # the same work
        ew = (((yw - exact) * a) ** 2).sum()
        ep = (((yp - exact) * a) ** 2).sum()
        assert ew < 0.8 * ep, (e, ew / ep)


@pytest.mark.parametrize(
    "a, exc, words",
    [
        ([1.0, 1.0, 1.0], errors.DTypeError, "numpy.ndarray"),
        (np.ones(3, dtype=np.int32), errors.DTypeError, "float"),
        (np.ones(4, dtype=np.float32), errors.ShapeError, r"\(3,\)"),
        (np.ones((1, 3), dtype=np.float32), errors.ShapeError, r"\(3,\)"),
        (np.array([1.0, np.nan, 1.0]), errors.NonFiniteError, "NaN"),
        (np.array([1.0, np.inf, 1.0]), errors.NonFiniteError, "NaN"),
        (np.array([1.0, -0.5, 1.0]), ValueError, "non-negative"),
        (np.zeros(3, dtype=np.float32), ValueError, "all zero"),
        (np.array([1.0, 1e6, 1.0]), ValueError, "overflows float16"),
    ],
)
def test_bad_out_weight(a, exc, words):
    w = np.full((5, 3), 100.0, dtype=np.float16)
    with pytest.raises(exc, match=words):
        pyeffort.build_buckets(w, out_weight=a)


def test_from_linear_passes_the_weights(rng):
    lin = rng.standard_normal((20, 8)).astype(np.float32)  # 8 inputs, 20 outputs
    a = weights(rng, 20)
    b = pyeffort.Buckets.from_linear(lin, out_weight=a)
    np.testing.assert_array_equal(b.positions, reference.build(lin.T.astype(np.float16), a)[1])


# ---------------------------------------------------------------- the file


def test_save_load_round_trips_the_stat(tmp_path, rng):
    w = rng.standard_normal((33, 50)).astype(np.float16)
    for a, stat in ((weights(rng, 50), STAT_OUT_WEIGHTED), (None, STAT)):
        b = pyeffort.build_buckets(w, a)
        b.save(tmp_path / "b.safetensors")
        assert fileformat.Reader(tmp_path / "b.safetensors").metadata["stat"] == stat
        c = pyeffort.load_buckets(tmp_path / "b.safetensors")
        assert c.stat == stat
        for k in ("values", "positions", "stats", "order"):
            np.testing.assert_array_equal(getattr(c, k), getattr(b, k))
        h = pyeffort.load_buckets(tmp_path / "b.safetensors", fraction=0.5)
        assert h.stat == stat and abs(h.loaded_fraction - 0.5) < 0.01


def _old_file(path, b, meta_extra):
    """A version-1 file as pyeffort wrote it before the stat could vary."""
    meta = {"format": "pyeffort", "version": "1", "kind": "buckets", "n_in": str(b.n_in)}
    meta.update({"n_out": str(b.n_out), "source_dtype": "float16", **meta_extra})
    fileformat.write(path, b.tensor_specs(), meta)


@pytest.mark.parametrize("extra", [{"stat": "rms"}, {}])
def test_old_files_load_unchanged(tmp_path, rng, extra):
    w = rng.standard_normal((40, 24)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    _old_file(tmp_path / "old.safetensors", b, extra)
    c = pyeffort.load_buckets(tmp_path / "old.safetensors")
    assert c.stat == STAT
    x = rng.standard_normal(40).astype(np.float32)
    assert np.array_equal(pyeffort.matmul(x, c, 0.4), pyeffort.matmul(x, b, 0.4))


def test_unknown_stat_is_a_format_error(tmp_path, rng):
    b = pyeffort.build_buckets(rng.standard_normal((8, 16)).astype(np.float16))
    _old_file(tmp_path / "f.safetensors", b, {"stat": "mean"})
    with pytest.raises(FormatError, match="stat='mean'"):
        pyeffort.load_buckets(tmp_path / "f.safetensors")


def test_numpy_twin_follows_the_buckets_statistic(rng):
    """The harness's bucket_twin reads ranks and statistics from the Buckets: it selects what
    pyeffort.matmul selects for an output-weighted build too (and differs from the plain one)."""
    from pyeffort.eval import rules

    w = (rng.standard_normal((96, 80)) * 0.1).astype(np.float16)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    st = rules.MatrixState(w, pyeffort.build_buckets(w, weights(rng, 80)))
    plain = rules.MatrixState(w)
    for e in (0.05, 0.3, 0.77):
        y1, m1, b1 = rules.pyeffort_rule(x, st, e)
        y2, m2, b2 = rules.bucket_twin(x, st, e)
        assert (m1, b1) == (m2, b2)
        np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4 * np.abs(y1).max())
        assert not np.allclose(y2, rules.bucket_twin(x, plain, e)[0], rtol=1e-3)
    before = rules.bucket_twin(x, st, 0.3)[0]
    rules.pin_rank_stack(st)  # the pinned stack is split by the same ranks
    np.testing.assert_array_equal(rules.bucket_twin(x, st, 0.3)[0], before)
    rules.unpin_rank_stack(st)


@pytest.mark.parametrize("n_in, n_out", [(1, 1), (17, 15), (33, 100), (8, 16)])
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_builder_matches_on_cpu_tensors(rng, n_in, n_out, weighted):
    """pyeffort.cuda's builder is torch code: run on CPU tensors, it gives the CPU builder's
    buckets bit for bit, with and without out_weight (on a GPU: tests/test_cuda.py)."""
    torch = pytest.importorskip("torch")
    from pyeffort import cuda

    w = rng.standard_normal((n_in, n_out)).astype(np.float16)
    w[0, : min(n_out, 5)] = 0.5  # ties
    a = weights(rng, n_out) if weighted else None
    got = cuda.build_canonical(torch.from_numpy(w), a)
    want = pyeffort.build_buckets(w, out_weight=a)
    for g, r in zip(got, (want.values, want.positions, want.stats, want.order)):
        np.testing.assert_array_equal(g.numpy(), r)
    if weighted:  # a tensor works as well as an array; bad weights raise as on the CPU
        got2 = cuda.build_canonical(torch.from_numpy(w), torch.from_numpy(a))
        np.testing.assert_array_equal(got2[0].numpy(), want.values)
        with pytest.raises(errors.ShapeError):
            cuda.build_canonical(torch.from_numpy(w), a[:-1] if n_out > 1 else np.ones(2, "f4"))
        with pytest.raises(ValueError, match="overflows"):
            cuda.build_canonical(torch.from_numpy(w), np.full(n_out, 1e6, np.float32))
