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


# ---------------------------------------------------------------- the Buckets constructor


def _parts(b):
    return dict(values=b.values.copy(), positions=b.positions.copy(), stats=b.stats.copy(),
                order=b.order.copy(), n_out=b.n_out)  # fmt: skip


def _bad_order(p, value):
    p["order"][3, 5] = value
    return p


BAD_ARRAYS = {  # each would make the compiled core read out of bounds or leave outputs unset
    "order out of range": lambda p: _bad_order(p, 32),
    "order negative": lambda p: _bad_order(p, -1),
    "order repeats an input": lambda p: _bad_order(p, int(p["order"][3, 6])),
    "order (16, n_in-1)": lambda p: {**p, "order": np.ascontiguousarray(p["order"][:, 1:])},
    "stats (16, n_in+1)": lambda p: {**p, "stats": np.zeros((16, 33), np.float32)},
    "stats (15, n_in)": lambda p: {**p, "stats": np.ascontiguousarray(p["stats"][1:])},
    "short positions": lambda p: {**p, "positions": np.ascontiguousarray(p["positions"][:-9])},
    "rows beyond 16 n_in": lambda p: {**p, "values": np.vstack([p["values"], p["values"][:1]]),
                                      "positions": np.vstack([p["positions"], p["positions"][:1]])},
    "n_out of fewer groups": lambda p: {**p, "n_out": 16},
    "n_out of more groups": lambda p: {**p, "n_out": 49},
    "n_out zero": lambda p: {**p, "n_out": 0},
    "n_out float": lambda p: {**p, "n_out": 20.0},
    "values float32": lambda p: {**p, "values": p["values"].astype(np.float32)},
    "positions int8": lambda p: {**p, "positions": p["positions"].view(np.int8)},
    "order int64": lambda p: {**p, "order": p["order"].astype(np.int64)},
    "values strided": lambda p: {**p, "values": np.repeat(p["values"], 2, axis=0)[::2]},
    "values 1-D": lambda p: {**p, "values": p["values"].ravel()},
    "stats NaN": lambda p: {**p, "stats": np.where(p["stats"] > 0, np.nan, 0).astype(np.float32)},
    "stats negative": lambda p: {**p, "stats": -p["stats"]},
    "stats rising": lambda p: {**p, "stats": np.ascontiguousarray(p["stats"][:, ::-1])},
    "values a list": lambda p: {**p, "values": p["values"].tolist()},
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_constructor_refuses_bad_arrays(b, case):
    """The public constructor checks what the compiled core trusts (it used to check nothing:
    these segfaulted at prepare/matmul or read out of bounds)."""
    p = BAD_ARRAYS[case](_parts(b))
    with pytest.raises((errors.ShapeError, errors.DTypeError, errors.LayoutError,
                        errors.FormatError)):  # fmt: skip
        pyeffort.Buckets(**p)
    with pytest.raises((ValueError, TypeError)):  # the structure is checked with verify=False
        pyeffort.Buckets(**p, verify=False)


def _damaged_data(b, what):
    p = _parts(b)
    n_in, g = b.n_in, b.n_groups
    if what == "inf":
        p["values"][-3, 0] = np.inf
    elif what == "nan":
        p["values"][n_in + 2, 1] = np.nan
    elif what == "repeated position":  # rank 1 of one input takes rank 0's position, group 0
        j = int(b.order[0, 4])
        r1 = n_in + int(np.nonzero(b.order[1] == j)[0][0])
        p["positions"][r1, 0] = (p["positions"][r1, 0] & 0xF0) | (p["positions"][4, 0] & 0x0F)
    elif what == "padding value":  # rank 15 of the last group (a padding slot) not zero
        p["values"][15 * n_in + 1, g - 1] = 1.0
    return p


@pytest.mark.parametrize("what", ["inf", "nan", "repeated position", "padding value"])
def test_constructor_refuses_damaged_data_unless_told(b, rng, what):
    p = _damaged_data(b, what)
    with pytest.raises(errors.FormatError):
        pyeffort.Buckets(**p)
    c = pyeffort.Buckets(**p, verify=False)  # trusted: the compiled core is the safety net
    assert c.shape == b.shape


def test_n_out_that_contradicts_the_padding_is_refused(b):
    """n_out=20: group 1 holds 4 real outputs and 12 padding slots; a smaller n_out in the same
    group count would drop real outputs."""
    for n_out in (17, 18, 19):
        with pytest.raises(errors.FormatError, match="padding"):
            pyeffort.Buckets(**{**_parts(b), "n_out": n_out})


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (9, 17), (20, 40), (17, 200), (8, 32)])
def test_every_build_passes_the_data_checks(backend, rng, shape):
    """build_buckets skips the data checks (it makes valid data): what it makes passes them,
    narrow last groups, zero weights, output weights and partial loads included."""
    w = rng.standard_normal(shape).astype(np.float16)
    w[:, ::3] = 0
    for a in (None, rng.random(shape[1]).astype(np.float32) + 0.1):
        c = pyeffort.build_buckets(w, a)
        for rows in (c.n_rows, c.n_rows // 3 + 1, 0):
            pyeffort.Buckets(c.values[:rows], c.positions[:rows], c.stats, c.order, c.n_out)


def test_buckets_arrays_are_held_read_only(b):
    p = _parts(b)
    c = pyeffort.Buckets(**p)
    with pytest.raises(AttributeError):
        c.order = np.zeros_like(p["order"])
    with pytest.raises(ValueError):
        c.values[0, 0] = 1.0
    p["order"][0, 0] = 10**6  # the caller's array changes later: the matrix keeps its copy
    assert c.order.max() < c.n_in
    assert p["values"].flags.writeable  # the caller's own arrays stay as they were


CRASH_CASES = """
import sys, numpy as np, pyeffort
b = pyeffort.build_buckets(np.random.default_rng(0).standard_normal((32, 20)).astype(np.float16))
v, p, s, o = (np.array(a) for a in (b.values, b.positions, b.stats, b.order))
bad_o = o.copy(); bad_o[0, 0] = 10**6
cases = {
    "order out of range": (v, p, s, bad_o, 20),
    "order (16, n_in-1)": (v, p, s, np.ascontiguousarray(o[:, 1:]), 20),
    "stats (16, n_in+1)": (v, p, np.zeros((16, 33), np.float32), o, 20),
    "short positions": (v, np.ascontiguousarray(p[:10]), s, o, 20),
    "n_out of more groups": (v, p, s, o, 200),
}
for name, args in cases.items():
    print(name, flush=True)
    try:
        B = pyeffort.Buckets(*args)
        pyeffort.prepare(B)
        pyeffort.matmul(np.ones(32, np.float32), B, 0.7)
        print("  accepted", flush=True)
    except (ValueError, TypeError) as exc:
        print("  refused:", type(exc).__name__, flush=True)
"""


def test_bad_arrays_never_reach_the_core():
    """In a subprocess, as the issue's crashes were: each case refused, the process alive."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CRASH_CASES], capture_output=True, text=True,
                       timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert r.stdout.count("refused") == 5, r.stdout
