"""Bad input gets a clear exception that names the problem; garbage never kills the process."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyeffort
from pyeffort import errors


@pytest.fixture(scope="module")
def b():
    return pyeffort.build_buckets(
        np.random.default_rng(0).standard_normal((32, 20)).astype(np.float16)
    )


X = np.ones(32, dtype=np.float32)


@pytest.mark.parametrize(
    "x, exc, words",
    [
        (np.ones(31, dtype=np.float32), errors.ShapeError, "n_in=32"),
        (np.ones((2, 2, 32), dtype=np.float32), errors.ShapeError, "shape"),
        (np.ones(32, dtype=np.float64), errors.DTypeError, "float64"),
        (np.ones(32, dtype=np.int32), errors.DTypeError, "int32"),
        (np.ones(64, dtype=np.float32)[::2], errors.LayoutError, "contiguous"),
        ([1.0] * 32, errors.DTypeError, "list"),
        (np.full(32, np.nan, dtype=np.float32), errors.NonFiniteError, "NaN"),
        (np.array([np.inf] + [0.0] * 31, dtype=np.float32), errors.NonFiniteError, "Inf"),
    ],
)
def test_bad_x(backend, b, x, exc, words):
    with pytest.raises(exc, match=words):
        pyeffort.matmul(x, b, 0.5)


@pytest.mark.parametrize("effort", [-0.1, 1.5, math.nan, math.inf, "0.5", None, True])
def test_bad_effort(b, effort):
    with pytest.raises(errors.EffortError):
        pyeffort.matmul(X, b, effort)


def test_errors_subclass_builtins():
    assert issubclass(errors.ShapeError, ValueError)
    assert issubclass(errors.DTypeError, TypeError)
    assert issubclass(errors.FormatError, ValueError)
    assert issubclass(errors.NonFiniteError, ValueError)
    assert issubclass(errors.EffortError, ValueError)


@pytest.mark.parametrize(
    "out, exc",
    [
        (np.empty(19, dtype=np.float32), errors.ShapeError),
        (np.empty(20, dtype=np.float64), errors.DTypeError),
        (np.empty(40, dtype=np.float32)[::2], errors.LayoutError),
        ("out", errors.DTypeError),
    ],
)
def test_bad_out(b, out, exc):
    with pytest.raises(exc):
        pyeffort.matmul(X, b, 0.5, out=out)


@pytest.mark.parametrize(
    "w, exc",
    [
        (np.ones(5, dtype=np.float32), errors.ShapeError),
        (np.ones((0, 5), dtype=np.float32), errors.ShapeError),
        (np.ones((3, 3), dtype=np.int64), errors.DTypeError),
        (np.array([[1.0, np.nan]], dtype=np.float32), errors.NonFiniteError),
        (np.array([[1e6]], dtype=np.float32), ValueError),
        ("W", errors.DTypeError),
    ],
)
def test_bad_weights(w, exc):
    with pytest.raises(exc):
        pyeffort.build_buckets(w)


def test_wrong_vector_for_buckets(b):
    other = pyeffort.build_buckets(np.ones((20, 32), dtype=np.float16))
    with pytest.raises(errors.ShapeError, match="n_in=20"):
        pyeffort.matmul(X, other, 0.5)


def test_bad_dense_and_fraction(tmp_path):
    with pytest.raises(errors.DTypeError, match="float16"):
        pyeffort.dense_matmul(X, np.ones((32, 4), dtype=np.float32))
    with pytest.raises(errors.LayoutError):
        pyeffort.dense_matmul(X, np.ones((4, 32), dtype=np.float16).T)
    with pytest.raises(errors.ShapeError):
        pyeffort.dense_matmul(X, np.ones((31, 4), dtype=np.float16))
    with pytest.raises(errors.EffortError, match="fraction"):
        pyeffort.load_buckets(tmp_path / "x", fraction=2.0)
    with pytest.raises(ValueError):
        pyeffort.set_num_threads(0)


garbage = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.floats(), max_size=4),
    st.builds(
        lambda shape, dt: np.zeros(shape, dtype=dt),
        st.lists(st.integers(0, 40), max_size=3).map(tuple),
        st.sampled_from(["float16", "float32", "float64", "int8", "uint16", "bool", "complex64"]),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=garbage, w=garbage, effort=garbage, fraction=garbage)
def test_garbage_never_crashes(tmp_path_factory, x, w, effort, fraction):
    b = pyeffort.build_buckets(np.ones((8, 8), dtype=np.float16))
    calls = [
        lambda: pyeffort.matmul(x, b, effort),
        lambda: pyeffort.matmul(x, w, 0.5),
        lambda: pyeffort.matmul(X[:8].copy(), b, effort, out=w),
        lambda: pyeffort.build_buckets(w),
        lambda: pyeffort.dense_matmul(x, w),
        lambda: pyeffort.Buckets.from_linear(w),
        lambda: pyeffort.load_buckets(str(x), fraction=fraction),
        lambda: pyeffort.set_num_threads(x),
    ]
    for call in calls:
        try:
            call()
        except (ValueError, TypeError, errors.PyEffortError):
            pass


def test_matmul_group_bad_input(rng):
    b1 = pyeffort.build_buckets(rng.standard_normal((32, 16)).astype(np.float16))
    b2 = pyeffort.build_buckets(rng.standard_normal((24, 16)).astype(np.float16))
    x = np.ones(32, np.float32)
    with pytest.raises(pyeffort.ShapeError, match="share n_in"):
        pyeffort.matmul_group(x, [b1, b2])
    with pytest.raises(pyeffort.ShapeError, match="2 efforts for 1 matrices"):
        pyeffort.matmul_group(x, [b1], [0.5, 0.5])
    with pytest.raises(pyeffort.ShapeError, match="1 to 4"):
        pyeffort.matmul_group(x, [b1] * 5)
    with pytest.raises(pyeffort.DTypeError, match="Buckets"):
        pyeffort.matmul_group(x, [b1, np.ones((32, 16), np.float16)])
    with pytest.raises(pyeffort.EffortError):
        pyeffort.matmul_group(x, [b1], [1.5])
    with pytest.raises(pyeffort.ShapeError, match="inputs"):
        pyeffort.matmul_group(np.ones(31, np.float32), [b1])
    with pytest.raises(pyeffort.NonFiniteError):
        pyeffort.matmul_group(np.full(32, np.nan, np.float32), [b1, b1], 0.5)
    # a batch of tokens is one matmul per matrix: the same results
    xs = rng.standard_normal((3, 32)).astype(np.float32)
    (y,) = pyeffort.matmul_group(xs, [b1], 0.4)
    assert np.array_equal(y, pyeffort.matmul(xs, b1, 0.4))
