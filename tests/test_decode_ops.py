"""The compiled decoding steps (src/cpu/decode.c through pyeffort._core) against their numpy spec
(reference.rmsnorm / silu_mul / rope / attend), at odd sizes, with the errors a wrong shape raises."""

import numpy as np
import pytest

from pyeffort import _core
from pyeffort import reference as R
from pyeffort.errors import ShapeError

TOL = {"rtol": 2e-6, "atol": 2e-6}  # float32 rounding: summation order and the softmax's exp


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 576, 1001])
def test_rmsnorm(rng, n):
    x, w = f32(rng, n, scale=3.0), f32(rng, n)
    a, b = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    _core.rmsnorm(x, w, 1e-5, a)
    R.rmsnorm(x, w, 1e-5, b)
    np.testing.assert_allclose(a, b, **TOL)
    _core.rmsnorm(np.zeros(n, np.float32), w, 1e-5, a)  # all zero: eps keeps it finite
    assert np.array_equal(a, np.zeros(n, np.float32))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1536, 1001])
def test_silu_mul(rng, n):
    g, u = f32(rng, n, scale=4.0), f32(rng, n)
    g[: min(n, 6)] = [0.0, -0.0, 95.0, -95.0, 88.5, -88.5][: min(n, 6)]  # exp(-g) overflows
    a, b = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    _core.silu_mul(g, u, a)
    R.silu_mul(g, u, b)
    np.testing.assert_allclose(a, b, **TOL)
    assert np.isfinite(a).all()
    g = np.array([np.inf, np.nan, 1.0], np.float32)
    _core.silu_mul(g, np.ones(3, np.float32), a[:3] if n >= 3 else np.empty(3, np.float32))
    if n >= 3:  # silu(inf) = inf; a NaN stays NaN (the matmul then refuses it)
        assert a[0] == np.inf and np.isnan(a[1]) and np.isclose(a[2], 1 / (1 + np.exp(-1.0)))


@pytest.mark.parametrize("heads, hd", [(1, 2), (3, 6), (9, 64), (4, 130)])
def test_rope(rng, heads, hd):
    x, c, s = f32(rng, heads, hd), f32(rng, hd // 2), f32(rng, hd // 2)
    a, b = x.copy(), x.copy()
    _core.rope(a, c, s)
    R.rope(b, c, s)
    np.testing.assert_allclose(a, b, **TOL)
    assert not np.array_equal(a, x)


@pytest.mark.parametrize(
    "n_heads, n_kv, hd, cap, lo, end",
    [
        (1, 1, 1, 1, 0, 1),
        (4, 2, 16, 40, 0, 33),
        (9, 3, 64, 300, 17, 250),
        (6, 6, 10, 9, 8, 9),
        (8, 1, 130, 70, 3, 70),
    ],
)
def test_attend(rng, n_heads, n_kv, hd, cap, lo, end):
    q = f32(rng, n_heads, hd, scale=2.0)
    k, v = f32(rng, n_kv, cap, hd, scale=2.0), f32(rng, n_kv, cap, hd)
    a, b = np.full((n_heads, hd), np.nan, np.float32), np.empty((n_heads, hd), np.float32)
    _core.attend(q, k, v, lo, end, 1 / np.sqrt(hd), a)
    R.attend(q, k, v, lo, end, 1 / np.sqrt(hd), b)
    np.testing.assert_allclose(a, b, **TOL)
    # the positions outside [lo, end) are not read
    k2, v2 = k.copy(), v.copy()
    k2[:, :lo], v2[:, :lo], k2[:, end:], v2[:, end:] = 1e30, np.nan, 1e30, np.nan
    _core.attend(q, k2, v2, lo, end, 1 / np.sqrt(hd), a)
    np.testing.assert_allclose(a, b, **TOL)


def test_attend_one_dominant_key(rng):
    """A score far above the others: the softmax is one-hot (no overflow, exp underflows to 0)."""
    q, k, v = f32(rng, 2, 8), f32(rng, 1, 5, 8), f32(rng, 1, 5, 8)
    k[0, 3] = 1e3 * q[0]
    out = np.empty((2, 8), np.float32)
    _core.attend(q, k, v, 0, 5, 1.0, out)
    np.testing.assert_allclose(out[0], v[0, 3], rtol=1e-6)


def test_bad_shapes_raise():
    z = np.zeros
    with pytest.raises(ShapeError, match="rmsnorm"):
        _core.rmsnorm(z(4, np.float32), z(5, np.float32), 1e-5, z(4, np.float32))
    with pytest.raises(ShapeError, match="silu_mul"):
        _core.silu_mul(z(4, np.float32), z(3, np.float32), z(4, np.float32))
    with pytest.raises(ShapeError, match="silu_mul"):
        _core.silu_mul(z(0, np.float32), z(0, np.float32), z(0, np.float32))
    with pytest.raises(ShapeError, match="rope"):
        _core.rope(z((2, 5), np.float32), z(2, np.float32), z(2, np.float32))
    with pytest.raises(ShapeError, match="rope"):
        _core.rope(z((2, 8), np.float32), z(4, np.float32), z(3, np.float32))
    q, kv = z((4, 8), np.float32), z((2, 10, 8), np.float32)
    out = z((4, 8), np.float32)
    for lo, end in [(0, 0), (5, 4), (0, 11), (-1, 3)]:
        with pytest.raises(ShapeError, match="attend"):
            _core.attend(q, kv, kv, lo, end, 1.0, out)
    with pytest.raises(ShapeError, match="attend"):  # 3 heads on 2 kv heads
        _core.attend(z((3, 8), np.float32), kv, kv, 0, 4, 1.0, z((3, 8), np.float32))
    with pytest.raises(ShapeError, match="attend"):
        _core.attend(q, kv, z((2, 9, 8), np.float32), 0, 4, 1.0, out)
    with pytest.raises(ValueError):  # float64 is refused by the typed views, not cast
        _core.rmsnorm(z(4), z(4, np.float32), 1e-5, z(4, np.float32))
