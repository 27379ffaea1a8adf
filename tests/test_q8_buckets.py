"""q8 buckets in the Python API: ``build_buckets(W, values="q8")`` against the spec written out
per block, the checks of ``Buckets(..., scales=)``, ``bytes_per_mult``, ``to_dense`` and
``pyeffort.matmul`` on q8 matrices (both backends)."""

import numpy as np
import pytest

import pyeffort
from pyeffort import DTypeError, FormatError, ShapeError, reference

# n_out % 64 != 0, n_out < 16, one input, several chunks with a short last one
SHAPES = [(37, 70), (5, 7), (1, 3), (3, 16), (9, 200), (64, 64), (17, 129)]


def weights(rng, shape):
    n_in = shape[0]
    w = rng.standard_normal(shape) * rng.random((n_in, 1)) * 0.05
    w[0] = 0  # a zero input: scales 0, values 0
    if n_in > 2:
        w[1] *= 1e-4  # subnormal fp16 weights and scales
    return w.astype(np.float16)


def spec_q8(values, order):
    """The module docstring of reference.py, one block of 16 values at a time."""
    n_in, (rows, g) = order.shape[1], values.shape
    q = np.zeros((rows, g), dtype=np.int8)
    scales = np.zeros((4 * n_in, -(-g // 4)), dtype=np.float16)
    row_of = {(k, int(order[k, j])): k * n_in + j for k in range(16) for j in range(n_in)}
    for t in range(4):
        for j in range(n_in):
            i = int(order[4 * t, j])
            rs = [row_of[(k, i)] for k in range(4 * t, 4 * t + 4)]
            for c in range(-(-g // 4)):
                cols = slice(4 * c, min(4 * c + 4, g))
                block = values[rs, cols].astype(np.float32)
                m = np.float32(np.abs(block).max())
                s = np.float16(m / np.float32(127))
                if np.float32(s) * np.float32(127) < m:
                    s = np.nextafter(s, np.float16(np.inf))
                scales[t * n_in + j, c] = s
                if s > 0:
                    q[rs, cols] = np.clip(np.rint(block / np.float32(s)), -127, 127)
    return q, scales


# ---------------------------------------------------------------- build


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_weighted", [False, True])
def test_build_is_the_spec_bit_for_bit(backend, rng, shape, out_weighted):
    w = weights(rng, shape)
    a = np.exp(rng.standard_normal(shape[1])).astype(np.float32) if out_weighted else None
    b16 = pyeffort.build_buckets(w, a)
    b8 = pyeffort.build_buckets(w, a, values="q8")
    assert (b16.values_kind, b8.values_kind) == ("f16", "q8")
    assert b16.scales is None and b8.values.dtype == np.int8 and b8.scales.dtype == np.float16
    for k in ("positions", "stats", "order"):  # the selection is the fp16 build's
        np.testing.assert_array_equal(getattr(b8, k), getattr(b16, k))
    assert b8.stat == b16.stat
    q, scales = spec_q8(np.asarray(b16.values), b16.order)
    np.testing.assert_array_equal(b8.values, q)
    np.testing.assert_array_equal(b8.scales.view(np.uint16), scales.view(np.uint16))


def test_from_linear_passes_the_value_kind(rng):
    lin = rng.standard_normal((40, 24)).astype(np.float32)  # (n_out, n_in)
    b = pyeffort.Buckets.from_linear(lin, values="q8")
    assert b.shape == (24, 40) and b.values_kind == "q8"
    np.testing.assert_array_equal(b.values, pyeffort.build_buckets(lin.T, values="q8").values)


@pytest.mark.parametrize("bad", ["Q8", "q4", "int8", None, 8, b"q8"])
def test_unknown_value_kinds_are_refused(rng, bad):
    w = rng.standard_normal((8, 16)).astype(np.float16)
    with pytest.raises(ValueError, match="values must be one of"):
        pyeffort.build_buckets(w, values=bad)


# ---------------------------------------------------------------- properties


def test_bytes_per_mult_nbytes_and_repr(rng):
    w = rng.standard_normal((48, 256)).astype(np.float16)  # G = 16: no padding anywhere
    b16, b8 = pyeffort.build_buckets(w), pyeffort.build_buckets(w, values="q8")
    assert b16.bytes_per_mult == 2.5 and b8.bytes_per_mult == 1.625
    assert b8.nbytes == b8.values.nbytes + b8.positions.nbytes + b8.scales.nbytes
    assert b8.nbytes == 48 * 256 * 1.625
    assert "values='q8'" in repr(b8) and "values='f16'" in repr(b16)
    odd = pyeffort.build_buckets(w[:, :70], values="q8")  # padded groups and chunks cost more
    assert odd.bytes_per_mult == odd.nbytes / (48 * 70) > 1.625


def test_to_dense_dequantises(rng):
    w = weights(rng, (37, 70))
    b16, b8 = pyeffort.build_buckets(w), pyeffort.build_buckets(w, values="q8")
    q, scales = spec_q8(np.asarray(b16.values), b16.order)
    n_in, g = w.shape[0], b16.n_groups
    pos = reference.unpack_nibbles(np.asarray(b16.positions), g)
    want = np.zeros((n_in, 16 * g), dtype=np.float32)
    for k in range(16):
        for j in range(n_in):
            i, t = int(b16.order[k, j]), k // 4
            srow = t * n_in + int(np.nonzero(b16.order[4 * t] == i)[0][0])
            for c in range(g):  # q * scale: exact in float32
                want[i, 16 * c + pos[k * n_in + j, c]] = q[k * n_in + j, c] * np.float32(
                    scales[srow, c // 4]
                )
    np.testing.assert_array_equal(b8.to_dense(np.float32), want[:, :70])
    np.testing.assert_array_equal(b8.to_dense(), want[:, :70].astype(np.float16))
    assert b8.to_dense().dtype == np.float16
    with pytest.raises(DTypeError):
        b8.to_dense(np.float64)


# ---------------------------------------------------------------- the constructor's checks


def parts(rng, shape=(20, 70)):
    b = pyeffort.build_buckets(weights(rng, shape), values="q8")
    return [np.array(a) for a in (b.values, b.positions, b.stats, b.order)], b.scales, b.n_out


def test_int8_values_need_scales_and_fp16_values_none(rng):
    (v, p, s, o), sc, n_out = parts(rng)
    with pytest.raises(DTypeError, match="need their scales"):
        pyeffort.Buckets(v, p, s, o, n_out)
    b16 = pyeffort.build_buckets(weights(rng, (20, 70)))
    with pytest.raises(DTypeError, match="take no scales"):
        pyeffort.Buckets(b16.values, p, s, o, n_out, scales=sc)
    with pytest.raises(DTypeError, match="float16 or int8"):
        pyeffort.Buckets(v.astype(np.uint8), p, s, o, n_out, scales=sc)
    with pytest.raises(DTypeError, match="scales must be float16"):
        pyeffort.Buckets(v, p, s, o, n_out, scales=sc.astype(np.float32))


def test_scales_shape_follows_the_loaded_rows(rng):
    (v, p, s, o), sc, n_out = parts(rng)
    n_in = s.shape[1]
    for n_rows in (0, 1, n_in, 4 * n_in + 3, 9 * n_in, 16 * n_in):
        k = reference.scale_rows(n_rows, n_in)
        b = pyeffort.Buckets(v[:n_rows], p[:n_rows], s, o, n_out, scales=np.array(sc[:k]))
        assert b.scales.shape == (k, 2) and b.n_rows == n_rows
    for bad in (sc[:-1], sc[:, :1], np.zeros((4 * n_in + 1, 2), np.float16)):
        with pytest.raises(ShapeError, match="scales"):
            pyeffort.Buckets(v, p, s, o, n_out, scales=np.array(bad))
    with pytest.raises(ShapeError, match="scales"):  # a row prefix needs only its scales
        pyeffort.Buckets(v[: n_in + 1], p[: n_in + 1], s, o, n_out, scales=sc)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, -6e-8])
def test_non_finite_or_negative_scales_are_refused(rng, bad):
    (v, p, s, o), sc, n_out = parts(rng)
    sc = np.array(sc)
    sc[7, 1] = bad
    for verify in (True, False):  # the structure: checked always
        with pytest.raises(FormatError, match="scales must be finite and non-negative"):
            pyeffort.Buckets(v, p, s, o, n_out, verify=verify, scales=sc)


def test_minus_128_is_refused(rng):
    (v, p, s, o), sc, n_out = parts(rng)
    v[33, 2] = -128
    with pytest.raises(FormatError, match="-128"):
        pyeffort.Buckets(v, p, s, o, n_out, scales=sc)
    v[33, 2] = -127
    pyeffort.Buckets(v, p, s, o, n_out, scales=sc)


def test_q8_padding_is_checked(rng):
    (v, p, s, o), sc, n_out = parts(rng)  # n_out = 70: ranks 6.. of the last group are padding
    n_in = s.shape[1]
    v[10 * n_in + 3, -1] = 1
    with pytest.raises(FormatError, match="padding"):
        pyeffort.Buckets(v, p, s, o, n_out, scales=sc)


# ---------------------------------------------------------------- matmul


def selected_product(x, b16, b8, effort):
    """The rows the fp16 build dispatches (reference.cutoff), times b8's dequantised values."""
    g, n_in = b16.n_groups, b16.n_in
    vals = reference.dequantise(b8.values, b8.scales, b8.order)
    pos = reference.unpack_nibbles(np.asarray(b16.positions), g).astype(np.int64)
    cols = 16 * np.arange(g)[None, :] + pos
    inputs = b16.order.ravel()[: b16.n_rows]
    y = np.zeros((x.shape[0], 16 * g))
    for t in range(x.shape[0]):
        _, disp = reference.cutoff(x[t], b16.stats, b16.order, b16.n_rows, b16.n_out, effort)
        r = np.nonzero(disp)[0]
        np.add.at(y[t], cols[r], x[t, inputs[r], None].astype(np.float64) * vals[r])
    return y[:, : b16.n_out], n_in


@pytest.mark.parametrize("shape", [(37, 70), (5, 7), (64, 192), (17, 129)])
def test_matmul_is_the_selection_of_the_fp16_build_on_the_q8_values(backend, rng, shape):
    w = weights(rng, shape)
    b16, b8 = pyeffort.build_buckets(w), pyeffort.build_buckets(w, values="q8")
    x = rng.standard_normal((3, shape[0])).astype(np.float32)
    for e in (0.1, 0.5, 1.0):
        y, info = pyeffort.matmul(x, b8, e, return_info=True)
        _, info16 = pyeffort.matmul(x, b16, e, return_info=True)
        want, _ = selected_product(x, b16, b8, e)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max() + 1e-30)
        assert info.mults == info16.mults  # the selection is unchanged
        rows = info16.bytes_read // reference.row_bytes(b16.n_groups)
        assert info.bytes_read > rows * reference.row_bytes(b16.n_groups, True) or not rows
    exact = x.astype(np.float64) @ b8.to_dense(np.float32).astype(np.float64)
    np.testing.assert_allclose(pyeffort.matmul(x, b8, 1.0), exact, rtol=1e-4, atol=1e-6)


def test_matmul_group_prepare_and_prefetch_take_q8(backend, rng):
    w = weights(rng, (40, 96))
    bs = [pyeffort.build_buckets(w, values="q8"), pyeffort.build_buckets(w[:, :50])]
    x = rng.standard_normal(40).astype(np.float32)
    pyeffort.prepare(bs[0])
    pyeffort.prefetch(bs)
    ys = pyeffort.matmul_group(x, bs, [0.4, 0.7])
    for y, b, e in zip(ys, bs, [0.4, 0.7]):
        np.testing.assert_array_equal(y, pyeffort.matmul(x, b, e))
