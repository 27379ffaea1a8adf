"""The semantics reference.py defines, checked on every backend."""

import numpy as np
import pytest

import pyeffort
from pyeffort import reference

EFFORTS = [0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 0.9, 1.0]


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(512, 256), (333, 517), (96, 1100)])
def test_realised_effort_matches_request(backend, rng, shape):
    w = rng.standard_normal(shape).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = rng.standard_normal(shape[0]).astype(np.float32) * rng.gamma(1.0, size=shape[0])
    for e in EFFORTS:
        _, info = pyeffort.matmul(x.astype(np.float32), b, e, return_info=True)
        assert abs(info.effort - e) <= 0.01, (e, info.effort)
        assert info.bytes_read == pytest.approx(info.effort * b.nbytes, rel=0.02)


def test_effort_one_is_the_full_product(backend, rng):
    w = (rng.standard_normal((700, 300)) * 0.02).astype(np.float16)
    x = rng.standard_normal(700).astype(np.float32)
    y, info = pyeffort.matmul(x, pyeffort.build_buckets(w), 1.0, return_info=True)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert info.effort == 1.0
    assert rel_err(y, exact) <= 2e-3
    assert rel_err(y, exact) <= 1e-5  # float32 accumulation, no truncation bias at all


def test_matches_reference_and_skips_smallest(backend, rng):
    w = rng.standard_normal((400, 160)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = rng.standard_normal(400).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    prev = None
    for e in [0.1, 0.25, 0.5, 0.75]:
        y = pyeffort.matmul(x, b, e)
        c = cosine(y, exact)
        assert c > cosine(reference.oracle(x, w, e), exact) - 0.05
        assert prev is None or c > prev  # more effort, closer
        prev = c


def test_each_input_contributes_a_prefix_of_its_ranks(rng):
    w = rng.standard_normal((64, 48)).astype(np.float16)
    _values, _positions, stats, order = reference.build(w)
    x = rng.standard_normal(64).astype(np.float32)
    _, disp = reference.cutoff(x, stats, order, 16 * 64, 48, 0.3)
    per_input = np.zeros((16, 64), dtype=bool)
    per_input[np.arange(16)[:, None], order] = disp.reshape(16, 64)
    k_i = per_input.sum(0)
    assert (per_input == (np.arange(16)[:, None] < k_i[None, :])).all()


@pytest.mark.parametrize("n_in", [1, 2, 15, 16, 17, 33])
@pytest.mark.parametrize("n_out", [1, 3, 15, 16, 17, 31, 100])
def test_any_size_matches_reference(backend, rng, n_in, n_out):
    w = rng.standard_normal((n_in, n_out)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    for e in [0.0, 0.3, 1.0]:
        y = pyeffort.matmul(x, b, e)
        ref = np.empty_like(y)
        reference.bucketmul(x, b.values, b.positions, b.stats, b.order, n_out, e, ref)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max() + 1e-30)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(pyeffort.matmul(x, b, 1.0), exact, rtol=1e-4, atol=1e-4)


def test_same_inputs_same_bits(backend, rng):
    w = rng.standard_normal((1000, 900)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = rng.standard_normal(1000).astype(np.float32)
    runs = []
    for threads in [1, 2, 1, 2]:
        pyeffort.set_num_threads(threads)
        runs.append(pyeffort.matmul(x, b, 0.3))
    pyeffort.set_num_threads(2)
    for r in runs[1:]:
        assert np.array_equal(r.view(np.uint32), runs[0].view(np.uint32))


def test_batched_rows_are_independent_tokens(backend, rng):
    w = rng.standard_normal((128, 64)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    ys, info = pyeffort.matmul(x, b, 0.4, return_info=True)
    for t in range(5):
        assert np.array_equal(ys[t], pyeffort.matmul(x[t].copy(), b, 0.4))
    assert abs(info.effort - 0.4) < 0.02


def test_float16_activations_and_out(backend, rng):
    w = rng.standard_normal((64, 32)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    x16 = rng.standard_normal(64).astype(np.float16)
    out = np.full(32, np.nan, dtype=np.float32)
    res = pyeffort.matmul(x16, b, 0.5, out=out)
    assert res is out and np.isfinite(out).all()
    np.testing.assert_array_equal(out, pyeffort.matmul(x16.astype(np.float32), b, 0.5))


def test_weight_dtypes_and_from_linear(backend, rng):
    w = rng.standard_normal((48, 20)).astype(np.float32)
    b32 = pyeffort.build_buckets(w)
    b16 = pyeffort.build_buckets(w.astype(np.float16))
    assert np.array_equal(b32.values, b16.values)
    bl = pyeffort.Buckets.from_linear(w.T.copy())  # (n_out, n_in) layer weight
    assert bl.shape == (48, 20) and np.array_equal(bl.values, b16.values)
    np.testing.assert_array_equal(b16.to_dense(), w.astype(np.float16))
    assert b16.to_dense().flags.c_contiguous  # 20 outputs: a padded last group is cut off


def test_dense_matmul_is_accurate(backend, rng):
    w = rng.standard_normal((333, 77)).astype(np.float16)
    x = rng.standard_normal((2, 333)).astype(np.float32)
    y = pyeffort.dense_matmul(x, w)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_err(y, exact) < 1e-5


def test_ndarray_weights_slow_path(backend, rng):
    w = rng.standard_normal((40, 24)).astype(np.float16)
    x = rng.standard_normal(40).astype(np.float32)
    b = pyeffort.build_buckets(w)
    assert np.array_equal(pyeffort.matmul(x, w, 0.5), pyeffort.matmul(x, b, 0.5))


def test_build_same_on_both_backends(rng):
    from pyeffort import _core

    w = rng.standard_normal((200, 130)).astype(np.float16)
    w[3, :] = 0  # ties
    w[7, :16] = 1.0
    c_arrays, r_arrays = _core.build(w), reference.build(w)
    for a, r in zip(c_arrays, r_arrays):
        np.testing.assert_array_equal(a, r)


def test_bfloat16_weights_from_torch(backend):
    torch = pytest.importorskip("torch")
    w = torch.randn(40, 24, dtype=torch.bfloat16)
    b = pyeffort.build_buckets(w)
    assert b.source_dtype == "bfloat16"
    np.testing.assert_array_equal(b.to_dense(), w.float().numpy().astype(np.float16))
    lin = pyeffort.Buckets.from_linear(w.T)
    assert lin.shape == (40, 24)  # weight (n_out=24, n_in=40)


def test_prepare_builds_ahead_and_changes_nothing(backend, rng):
    w = (rng.standard_normal((70, 90)) * 0.05).astype(np.float16)
    x = rng.standard_normal(70).astype(np.float32)
    fresh = pyeffort.build_buckets(w)
    ready = pyeffort.prepare(pyeffort.build_buckets(w))
    np.testing.assert_array_equal(pyeffort.matmul(x, ready, 0.3), pyeffort.matmul(x, fresh, 0.3))
    with pytest.raises(pyeffort.DTypeError):
        pyeffort.prepare(w)
