"""An output that shares memory with the input is refused (the kernels read x while they write
out: dense_matmul(x, W, out=x) used to return a silently wrong result)."""

import numpy as np
import pytest

import pyeffort
from pyeffort.errors import LayoutError


@pytest.fixture
def square(rng):
    return rng.standard_normal((64, 64)).astype(np.float16)


def test_dense_matmul_refuses_out_equal_to_x(square, rng, backend):
    x = rng.standard_normal(64).astype(np.float32)
    want = pyeffort.dense_matmul(x.copy(), square)
    with pytest.raises(LayoutError, match="shares memory with x"):
        pyeffort.dense_matmul(x, square, out=x)
    out = np.empty(64, dtype=np.float32)  # a separate output still works
    np.testing.assert_array_equal(pyeffort.dense_matmul(x, square, out=out), want)


@pytest.mark.parametrize("effort", [0.3, 1.0])
def test_matmul_refuses_out_overlapping_x(square, rng, backend, effort):
    B = pyeffort.build_buckets(square)
    xs = rng.standard_normal((3, 64)).astype(np.float32)
    with pytest.raises(LayoutError, match="shares memory with x"):
        pyeffort.matmul(xs, B, effort, out=xs)
    buf = rng.standard_normal(65).astype(np.float32)
    with pytest.raises(LayoutError, match="shares memory with x"):  # overlapping, shifted
        pyeffort.matmul(buf[:64], B, effort, out=buf[1:])
    rows = rng.standard_normal((2, 64)).astype(np.float32)  # disjoint rows of one array
    y = pyeffort.matmul(rows[0], B, effort, out=rows[1])
    np.testing.assert_array_equal(y, pyeffort.matmul(rows[0].copy(), B, effort))
