"""The dense 8-bit baseline (pyeffort.dense, Q8_0): the quantisation against its definition,
every kernel set against the numpy reference at odd sizes, the same bits for any thread count,
both backends through pyeffort.dense_matmul, and bad input refused."""

import doctest

import numpy as np
import pytest

import pyeffort
from pyeffort import DenseQ8, _core, dense, quantize_dense_q8, reference
from pyeffort.errors import DTypeError, FormatError, LayoutError, NonFiniteError, ShapeError

KERNELS = _core.available_kernels()


@pytest.fixture(params=KERNELS)
def kernel(request):
    previous = _core.kernel_name()
    _core.use_kernel(request.param)
    yield request.param
    _core.use_kernel(previous)


@pytest.fixture
def threads():
    previous = _core.num_threads()
    yield
    _core.set_num_threads(previous)


SHAPES = [(333, 517), (8, 5), (70, 1000), (1, 33), (32, 16), (97, 64), (600, 3)]


def weights(rng, shape, dtype=np.float16):
    """Rows of mixed magnitude (scales that differ a lot between blocks) and exact zeros."""
    w = rng.standard_normal(shape) * rng.gamma(1.0, size=(shape[0], 1)) * 0.05
    w[rng.random(shape) < 0.05] = 0.0
    return w.astype(dtype)


def close(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def test_docstring_examples_run():
    result = doctest.testmod(dense, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("shape", [(333, 517), (64, 40), (1, 3), (31, 2)])
def test_quantisation_is_q8_0(rng, shape):
    w = weights(rng, shape, np.float32)
    wq = quantize_dense_q8(w)
    nb = -(-shape[0] // 32)
    assert wq.q.dtype == np.int8 and wq.q.shape == shape
    assert wq.scales.dtype == np.float16 and wq.scales.shape == (nb, shape[1])
    pad = np.zeros((nb * 32, shape[1]), np.float32)
    pad[: shape[0]] = w
    amax = np.abs(pad.reshape(nb, 32, shape[1])).max(axis=1)
    np.testing.assert_array_equal(wq.scales, reference.q8_scale(amax))
    s = np.repeat(wq.scales.astype(np.float32), 32, axis=0)[: shape[0]]
    assert (wq.scales.astype(np.float32) * 127 >= amax).all()  # nothing clipped
    assert np.abs(wq.dequantize() - w).max() <= (s / 2 * (1 + 1e-6)).max()
    assert (np.abs(wq.dequantize() - w) <= s / 2 * (1 + 1e-6)).all()
    assert np.abs(wq.q).max() <= 127
    np.testing.assert_array_equal(wq.dequantize(), wq.q.astype(np.float32) * s)


def test_bytes_per_weight_is_1_0625(rng):
    wq = quantize_dense_q8(weights(rng, (4096, 64)))
    assert wq.bytes_per_weight == 1.0625 and wq.nbytes == 4096 * 64 * 1.0625


@pytest.mark.parametrize("shape", SHAPES)
def test_every_kernel_set_matches_the_reference(kernel, rng, shape):
    wq = quantize_dense_q8(weights(rng, shape))
    x = (rng.standard_normal((3, shape[0])) * rng.gamma(1.0, size=shape[0])).astype(np.float32)
    got, ref = np.full((3, shape[1]), np.nan, np.float32), np.empty((3, shape[1]))
    _core.dense_q8(x, wq.q, wq.scales, got)
    dense.dense_q8(x, wq.q, wq.scales, ref)
    assert close(got, ref) <= 2e-6, kernel


def test_thread_counts_give_identical_bits(kernel, threads, rng):
    """Large enough to run on several threads, in several row parts (odd n_in: a short last
    block and part), for Q8_0 and fp16 alike."""
    w = weights(rng, (4129, 1037))  # q8 4.3 MB, fp16 8.6 MB: threaded
    wq = quantize_dense_q8(w)
    x = rng.standard_normal((2, 4129)).astype(np.float32)
    results = []
    for n in [1, 2, 3, 7, 16]:
        _core.set_num_threads(n)
        yq, yf = np.empty((2, 1037), np.float32), np.empty((2, 1037), np.float32)
        _core.dense_q8(x, wq.q, wq.scales, yq)
        _core.dense_f16(x, w, yf)
        results.append((yq, yf))
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])
    ref = np.empty((2, 1037))
    dense.dense_q8(x, wq.q, wq.scales, ref)
    assert close(results[0][0], ref) <= 2e-6


def test_dense_matmul_takes_a_dense_q8(backend, rng):
    w = weights(rng, (200, 70))
    wq = quantize_dense_q8(w)
    x = rng.standard_normal((4, 200)).astype(np.float32)
    want = x.astype(np.float64) @ wq.dequantize().astype(np.float64)
    y = pyeffort.dense_matmul(x, wq)
    assert y.shape == (4, 70) and y.dtype == np.float32 and close(y, want) <= 2e-6
    np.testing.assert_array_equal(pyeffort.dense_matmul(x[1], wq), y[1])
    out = np.empty(70, np.float32)
    assert pyeffort.dense_matmul(x[2].astype(np.float16), wq, out=out) is out
    # the quantisation error against the fp16 product: Q8_0's, far below the effort kernels'
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert 1e-5 < close(y, exact) < 2e-2


def test_bad_input_is_refused(rng):
    wq = quantize_dense_q8(weights(rng, (40, 8)))
    q, s = wq.q.copy(), wq.scales.copy()
    bad_q = q.copy()
    bad_q[3, 2] = -128
    neg, inf = s.copy(), s.copy()
    neg[1, 1], inf[0, 0] = -0.5, np.inf
    with pytest.raises(FormatError, match="-128"):
        DenseQ8(bad_q, s)
    for scales in (neg, inf):
        with pytest.raises(FormatError, match="scales"):
            DenseQ8(q, scales)
    with pytest.raises(ShapeError):
        DenseQ8(q, s[:1])
    with pytest.raises(DTypeError):
        DenseQ8(q.astype(np.int16), s)
    with pytest.raises(DTypeError):
        DenseQ8(q, s.astype(np.float32))
    with pytest.raises(LayoutError):
        DenseQ8(np.asfortranarray(q), s)
    with pytest.raises(ShapeError):
        pyeffort.dense_matmul(np.ones(41, np.float32), wq)
    with pytest.raises(NonFiniteError):
        pyeffort.dense_matmul(np.full(40, np.nan, np.float32), wq)
    with pytest.raises(NonFiniteError):
        quantize_dense_q8(np.full((4, 4), np.inf, np.float32))
    with pytest.raises(DTypeError):
        quantize_dense_q8(np.ones((4, 4), np.int32))
    with pytest.raises(ShapeError):
        quantize_dense_q8(np.ones((0, 4), np.float16))
    assert not wq.q.flags.writeable and not wq.scales.flags.writeable
