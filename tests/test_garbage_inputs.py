"""Garbage through every public function (hypothesis), in a subprocess so that a crash is a
failure: each call must return or raise a pyeffort error (ValueError / TypeError subclasses) —
never crash, hang, or raise anything else (IndexError, AttributeError, ...)."""

import os
import subprocess
import sys
import textwrap

import pytest

EXAMPLES = int(os.environ.get("PYEFFORT_GARBAGE", "60"))

SCRIPT = textwrap.dedent(
    r'''
    import math, os, sys, tempfile, threading
    import numpy as np
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis.extra import numpy as hnp
    import pyeffort

    ALLOWED = (ValueError, TypeError)  # every pyeffort error subclasses one of these
    N = int(sys.argv[1])
    CFG = settings(max_examples=N, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))

    dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int32, np.uint8,
                              np.int64, np.bool_, np.complex64])
    def arrays(max_dims=3, max_side=9):
        return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0,
                                                   max_side=max_side),
                          elements={"allow_nan": True, "allow_infinity": True}
                          if False else None).map(lambda a: a)
    floats = st.floats(allow_nan=True, allow_infinity=True)
    junk = st.one_of(st.none(), st.integers(-2**70, 2**70), floats, st.text(max_size=5),
                     st.lists(st.integers(), max_size=3), arrays(), st.just(object()))
    efforts = st.one_of(floats, st.integers(-3, 3), st.booleans(), st.none(), st.text(max_size=3),
                        st.lists(floats, max_size=5), arrays(1, 5))

    rng = np.random.default_rng(0)
    W = rng.standard_normal((40, 50)).astype(np.float16)
    B = pyeffort.build_buckets(W)

    COUNTS = {"calls": 0, "returned": 0}

    def call(f, *a, **k):
        COUNTS["calls"] += 1
        try:
            f(*a, **k)
            COUNTS["returned"] += 1
        except ALLOWED as exc:
            COUNTS[type(exc).__name__] = COUNTS.get(type(exc).__name__, 0) + 1

    def maybe_strided(a, flip):
        return a[..., ::2] if flip and a.ndim and a.shape[-1] > 1 else a

    @CFG
    @given(arrays(), st.booleans(), efforts, st.booleans())
    def t_matmul(x, flip, e, info):
        x = maybe_strided(x, flip)
        call(pyeffort.matmul, x, B, e, return_info=info)
        call(pyeffort.matmul, x, x, e)
        call(pyeffort.dense_matmul, x, W)
        call(pyeffort.dense_matmul, x, x)

    @CFG
    @given(st.lists(st.one_of(st.just(B), junk), max_size=6), arrays(2, 50), efforts)
    def t_group(Ws, x, e):
        call(pyeffort.matmul_group, x, Ws, e)
        call(pyeffort.prefetch, Ws)
        call(pyeffort.prepare, Ws[0] if Ws else None)

    @CFG
    @given(arrays(), st.one_of(st.none(), arrays(1, 60)))
    def t_build(w, a):
        call(pyeffort.build_buckets, w, a)
        call(pyeffort.Buckets.from_linear, w, a)

    @CFG
    @given(arrays(2, 20), arrays(2, 20), arrays(2, 20), arrays(2, 20),
           st.one_of(st.integers(-5, 300), junk), efforts)
    def t_constructor(v, p, s, o, n_out, e):
        COUNTS["calls"] += 1
        try:
            b = pyeffort.Buckets(v, p, s, o, n_out)
        except ALLOWED as exc:
            COUNTS[type(exc).__name__] = COUNTS.get(type(exc).__name__, 0) + 1
            return
        COUNTS["returned"] += 1
        x = np.ones(b.n_in, np.float32)
        call(pyeffort.matmul, x, b, 0.5 if not isinstance(e, float) else e)
        call(pyeffort.prepare, b)

    FIELDS = ("values", "positions", "stats", "order")

    @CFG
    @given(st.sampled_from(FIELDS), st.sampled_from(["shape-1", "shape+1", "poke", "dtype", "fortran"]),
           st.integers(0, 10**6), st.integers(-2**40, 2**40), st.integers(1, 80))
    def t_mutate(field, how, at, value, n_out):
        """A valid matrix with one field damaged: out-of-range or repeated order entries, a short
        or long array, a poked value (NaN, huge, negative), another dtype, another n_out."""
        arrays_ = {f: np.array(getattr(B, f)) for f in FIELDS}
        a = arrays_[field]
        if how == "shape-1":
            a = a[: max(a.shape[0] - 1, 0)] if at % 2 else a[:, :-1]
        elif how == "shape+1":
            a = np.concatenate([a, a[:1]]) if at % 2 else np.concatenate([a, a[:, :1]], axis=1)
        elif how == "poke":
            flat = a.reshape(-1)
            v = value if a.dtype.kind in "iu" else [np.nan, np.inf, -1.0, 1e30, float(value)][at % 5]
            flat[at % flat.size] = np.array(v).astype(a.dtype) if a.dtype.kind != "u" else value % 256
        elif how == "dtype":
            a = a.astype(np.float32 if a.dtype != np.float32 else np.float64)
        else:
            a = np.asfortranarray(a)
        arrays_[field] = a
        COUNTS["calls"] += 1
        try:
            b = pyeffort.Buckets(*(arrays_[f] for f in FIELDS), n_out if at % 3 == 0 else B.n_out)
        except ALLOWED as exc:
            COUNTS[type(exc).__name__] = COUNTS.get(type(exc).__name__, 0) + 1
            return
        COUNTS["returned"] += 1
        x = np.linspace(-1, 1, b.n_in, dtype=np.float32)
        for e in (1.0, 0.3):
            try:
                y1 = pyeffort.matmul(x, b, e)
                y2 = pyeffort.matmul(x, b, e)
            except ALLOWED:
                continue
            assert np.array_equal(y1, y2, equal_nan=True), "two identical calls differ"

    @CFG
    @given(junk, st.one_of(junk, floats))
    def t_misc(n, frac):
        call(pyeffort.set_num_threads, n)
        pyeffort.set_num_threads(2)
        call(pyeffort.load_buckets, os.devnull, fraction=frac)
        call(pyeffort.load_buckets, n)

    only = sys.argv[2:] or None
    for t in (t_matmul, t_group, t_build, t_constructor, t_mutate, t_misc):
        if only and t.__name__ not in only:
            continue
        t()
        print(t.__name__, "ok", flush=True)
    import json
    print("COUNTS", json.dumps(COUNTS, sort_keys=True))
    '''
)


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_garbage_never_crashes(backend, tmp_path):
    env = dict(os.environ, PYEFFORT_BACKEND=backend)
    script = tmp_path / "garbage.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(EXAMPLES)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(backend, r.stdout.splitlines()[-1])  # the counts (-s shows them)
