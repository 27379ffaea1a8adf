"""The q8 spec in reference.py: one fp16 scale per tier of an input over 4 groups, int8 values
within half a step of the fp16 weights, scales of a row prefix a prefix of ``scales``."""

import numpy as np
import pytest

from pyeffort import reference as R

SHAPES = [(37, 70), (64, 1000), (5, 16), (3, 200), (9, 33)]


def built(rng, shape):
    n_in, n_out = shape
    w = rng.standard_normal(shape) * rng.random((n_in, 1)) * 0.05
    w[0] = 0  # a zero input: its scales are 0
    w[1] *= 1e-4  # subnormal fp16 weights: subnormal scales
    w16 = w.astype(np.float16)
    return w16, R.build(w16)


def value_scales(scales, order, n_rows, g):
    srow = R._tier_position(order).ravel()[:n_rows]
    return np.asarray(scales, np.float64)[srow[:, None], (np.arange(g) // R.CHUNK)[None, :]]


@pytest.mark.parametrize("shape", SHAPES)
def test_values_within_half_a_step(rng, shape):
    _, (v, _, _, o) = built(rng, shape)
    q, sc = R.quantise_q8(v, o)
    assert q.dtype == np.int8 and sc.dtype == np.float16
    assert sc.shape == (4 * shape[0], R.n_chunks(v.shape[1]))
    assert np.abs(q.astype(int)).max() <= R.Q8_MAX
    step = value_scales(sc, o, v.shape[0], v.shape[1])
    err = np.abs(R.dequantise(q, sc, o) - v.astype(np.float64))
    assert (err <= step / 2).all()
    assert (sc[: shape[0]] == 0).any()  # input 0's tier-0 scales


@pytest.mark.parametrize("shape", SHAPES)
def test_one_scale_per_tier_of_an_input_and_chunk(rng, shape):
    """The 4 rows of a tier of one input read one scale per chunk of 4 groups, and it is the
    smallest fp16 that holds their largest |w| in 127 steps."""
    _, (v, _, _, o) = built(rng, shape)
    q, sc = R.quantise_q8(v, o)
    n_in, g = shape[0], v.shape[1]
    srow = R._tier_position(o)
    for t in range(4):
        for i in range(n_in):
            rows = [k * n_in + int(np.nonzero(o[k] == i)[0][0]) for k in range(4 * t, 4 * t + 4)]
            assert len({int(srow.ravel()[r]) for r in rows}) == 1
            s = sc[srow.ravel()[rows[0]]].astype(np.float32)
            for c in range(R.n_chunks(g)):
                m = np.abs(v[rows, 4 * c : 4 * c + 4].astype(np.float32)).max()
                assert s[c] * 127 >= m
                if m > 0:
                    below = np.nextafter(np.float16(s[c]), np.float16(0)).astype(np.float32)
                    assert below * 127 < m or below == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_scales_of_a_row_prefix_are_a_prefix(rng, shape):
    _, (v, _, _, o) = built(rng, shape)
    n_in = shape[0]
    srow = R._tier_position(o).ravel()
    for n_rows in sorted({0, 1, n_in, 4 * n_in - 1, 4 * n_in, 5 * n_in + 2, 12 * n_in + 1,
                          16 * n_in}):  # fmt: skip
        k = R.scale_rows(n_rows, n_in)
        used = set(srow[:n_rows].tolist())
        assert used == set(range(k)) or (not used and k == 0), n_rows


@pytest.mark.parametrize("shape", SHAPES)
def test_effort_one_is_the_product_of_the_dequantised_values(rng, shape):
    _, (v, p, s, o) = built(rng, shape)
    q, sc = R.quantise_q8(v, o)
    n_in, n_out = shape
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    y = np.empty((3, n_out), np.float32)
    mults, nbytes = R.bucketmul(x, q, p, s, o, n_out, 1.0, y, scales=sc)
    dense = np.zeros((n_in, 16 * v.shape[1]))
    cols = 16 * np.arange(v.shape[1])[None, :] + R.unpack_nibbles(p, v.shape[1])
    dense[o.ravel()[:, None], cols] = R.dequantise(q, sc, o)
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense[:, :n_out], rtol=1e-6, atol=1e-7)
    assert mults == 3 * n_in * n_out
    g = v.shape[1]
    assert nbytes == 3 * (16 * n_in * R.row_bytes(g, True) + 2 * R.n_chunks(g) * 4 * n_in)
