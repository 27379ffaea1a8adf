"""CPU speed of the effort matmul (fp16 and q8 buckets) against numpy float32 ``x @ W``
(OpenBLAS), our dense fp16 product and our dense 8-bit product (Q8_0, 1.0625 bytes per weight),
side by side in one run, one benchmark group per shape; bench/report.py gives every row's time
as a ratio to dense f16 and to dense q8. ``extra_info``: realised effort, weight bytes read,
GB/s, kernel, threads. Commands, machines and the current numbers: docs/RESULTS.md.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=2 PYEFFORT_BENCH_THREADS=2 \
        python -m pytest bench/test_matmul_speed.py --benchmark-json=OUT_t2.json -q
    python bench/report.py OUT_t1.json OUT_t2.json     # per file, then the threads sweep

``PYEFFORT_BENCH_THREADS=n`` runs our kernels on n threads (default: all cores); give numpy
the same n with ``OPENBLAS_NUM_THREADS``. Several files of one thread count are merged (the
median of their medians): runs repeated in turn interleave the kinds on a noisy machine.
"""

import functools
import os
import time

import numpy as np
import pytest

import pyeffort
from pyeffort import _core

# the large shapes of a 7B model's MLP, then the default model's (SmolLM2-135M: q/o 576x576,
# k/v 576x192, gate/up 576x1536, down 1536x576)
SHAPES = [(4096, 14336), (14336, 4096), (576, 1536), (1536, 576), (576, 576), (576, 192)]
EFFORTS = [1.0, 0.5, 0.25, 0.1]
CHANNELS = [0.5, 0.25]
# select_only: a call at effort 1e-9 (one row dispatched): cutoff search, dispatch and threads;
# channels_f: TEAL-style channel skipping on our dense kernel (the rows of the f n_in largest
# abs(x_i), picked per call)
KINDS = (
    ["numpy_f32", "dense_f16", "dense_q8"]
    + [f"effort_{e}" for e in EFFORTS]
    + [f"q8_effort_{e}" for e in EFFORTS]
    + ["select_only"]
    + [f"channels_{f}" for f in CHANNELS]
)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """PYEFFORT_BENCH_THREADS=n runs our kernels on n threads (default: all cores)."""
    n = os.environ.get("PYEFFORT_BENCH_THREADS")
    previous = _core.num_threads()
    if n:
        pyeffort.set_num_threads(int(n))
    yield
    pyeffort.set_num_threads(previous)


@functools.lru_cache(maxsize=1)
def takes_scales() -> bool:
    """Whether this build's compiled core multiplies q8 buckets (``_core.bucketmul(...,
    scales=)``, issue 19)."""
    b = pyeffort.build_buckets(np.ones((16, 16), np.float16))
    x, out = np.ones((1, 16), np.float32), np.empty((1, 16), np.float32)
    try:
        _core.bucketmul(x, b.values, b.positions, b.stats, b.order, b.n_out, 1.0, out, scales=None)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def problem(shape):
    """Random N(0, 0.02) fp16 weights and heavy-tailed activations (normal x gamma scale, as
    LLM activations have a few large channels); only one shape is kept in memory at a time,
    each form of the weights made at its first use."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    x = (rng.standard_normal(shape[0]) * rng.gamma(1.0, size=shape[0])).astype(np.float32)
    return w, x, {}


def form(shape, name):
    """The weights of shape as numpy f32, dense q8, fp16 or q8 buckets (made once)."""
    w, _, forms = problem(shape)
    if name not in forms:
        make = {
            "f32": lambda: w.astype(np.float32),
            "dense_q8": lambda: pyeffort.quantize_dense_q8(w),
            "buckets": lambda: pyeffort.build_buckets(w),
            "q8_buckets": lambda: pyeffort.build_buckets(w, values="q8"),
        }[name]
        forms[name] = make()
    return forms[name]


def rounds_for(shape):
    return 200 if shape[0] * shape[1] < 2_000_000 else 15


def case(shape, kind):
    """(fn, weight bytes read per call, realised effort) of one kind."""
    w16, x, _ = problem(shape)
    n = shape[0] * shape[1]
    out = np.empty(shape[1], np.float32)
    if kind == "numpy_f32":
        w32 = form(shape, "f32")
        return (lambda: x @ w32), 4 * n, 1.0
    if kind == "dense_f16":
        return (lambda: pyeffort.dense_matmul(x, w16, out=out)), 2 * n, 1.0
    if kind == "dense_q8":
        wq = form(shape, "dense_q8")
        return (lambda: pyeffort.dense_matmul(x, wq, out=out)), wq.nbytes, 1.0
    if kind.startswith("channels_"):
        f = float(kind.split("_")[1])
        out2, x2, k = out.reshape(1, -1), x.reshape(1, -1), round(f * shape[0])

        def fn():
            rows = np.argpartition(-np.abs(x), k - 1)[:k].astype(np.int32)
            return _core.dense_rows_f16(x2, w16, rows, out2)

        return fn, 2 * k * shape[1], k / shape[0]
    if kind.startswith("q8_"):
        try:
            if not takes_scales():
                raise TypeError("_core.bucketmul takes no scales")
            b = form(shape, "q8_buckets")
        except TypeError as exc:  # build_buckets(values=) or the kernels not there yet
            pytest.skip(f"q8 buckets not in this build (issue 19): {exc}")
    else:
        b = form(shape, "buckets")
    e = 1e-9 if kind == "select_only" else float(kind.rsplit("_", 1)[1])
    _, info = pyeffort.matmul(x, b, e, out=out, return_info=True)  # also packs once
    return (lambda: pyeffort.matmul(x, b, e, out=out)), info.bytes_read, info.effort


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_speed(measure, shape, kind):
    fn, nbytes, effort = case(shape, kind)
    name = f"{shape[0]}x{shape[1]}"
    median = measure(
        fn,
        group=f"matmul {name}",
        kind=kind,
        rounds=rounds_for(shape),
        baseline=kind == "dense_f16",
        shape=name,
        effort=effort,
        bytes=int(nbytes),
        kernel=_core.kernel_name(),
        threads=_core.num_threads(),
        blas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        rates={"gbps": nbytes / 1e9},
    )
    if kind == "numpy_f32" and median is not None:
        # OpenBLAS's worker threads keep spinning for a while after a call: on 2 cores they
        # would take a core from the next kind (our dense product) — let them go to sleep
        time.sleep(1.0)
