"""CPU speed of the effort matmul against numpy float32 ``x @ W`` (OpenBLAS) and our dense fp16
product, side by side in one run, one benchmark group per shape (the dense fp16 row is the
group's baseline). ``extra_info``: realised effort, weight bytes read, GB/s, kernel, threads.
Commands, machines and the current numbers: docs/RESULTS.md. Two threads (all cores):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest bench/test_matmul_speed.py \
        --benchmark-json=OUT.json -q && python bench/report.py OUT.json

and single-threaded (both libraries on one core, process CPU time):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 PYEFFORT_BENCH_THREADS=1 \
        python -m pytest bench/test_matmul_speed.py --benchmark-timer time.process_time \
        --benchmark-json=OUT_1t.json -q
"""

import functools
import os
import time

import numpy as np
import pytest

import pyeffort
from pyeffort import _core

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576)]
EFFORTS = [1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1]
CHANNELS = [0.67, 0.5, 0.33, 0.2]
# select_only: a call at effort 1e-9 (one row dispatched): cutoff search, dispatch and threads;
# channels_f: TEAL-style channel skipping on our dense kernel (the rows of the f n_in largest
# abs(x_i), picked per call), the peer that pyeffort's quality is compared with at equal time
KINDS = (
    ["numpy_f32", "dense_f16"]
    + [f"effort_{e}" for e in EFFORTS]
    + ["select_only"]
    + [f"channels_{f}" for f in CHANNELS]
)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """PYEFFORT_BENCH_THREADS=n runs our kernels on n threads (default: all cores); set
    OPENBLAS_NUM_THREADS to the same n for numpy."""
    n = os.environ.get("PYEFFORT_BENCH_THREADS")
    previous = _core.num_threads()
    if n:
        pyeffort.set_num_threads(int(n))
    yield
    pyeffort.set_num_threads(previous)


@functools.lru_cache(maxsize=1)
def problem(shape):
    """Random N(0, 0.02) fp16 weights and heavy-tailed activations (normal x gamma scale, as
    LLM activations have a few large channels); only one shape is kept in memory at a time."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    x = (rng.standard_normal(shape[0]) * rng.gamma(1.0, size=shape[0])).astype(np.float32)
    return w, w.astype(np.float32), pyeffort.build_buckets(w), x


def rounds_for(shape):
    return 200 if shape[0] * shape[1] < 2_000_000 else 15


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_speed(measure, shape, kind):
    w16, w32, b, x = problem(shape)
    name = f"{shape[0]}x{shape[1]}"
    n = shape[0] * shape[1]
    if kind == "numpy_f32":
        fn, nbytes, effort = (lambda: x @ w32), 4 * n, 1.0
    elif kind == "dense_f16":
        out = np.empty(shape[1], np.float32)
        fn, nbytes, effort = (lambda: pyeffort.dense_matmul(x, w16, out=out)), 2 * n, 1.0
    elif kind.startswith("channels_"):
        f = float(kind.split("_")[1])
        out = np.empty((1, shape[1]), np.float32)
        x2, k = x.reshape(1, -1), round(f * shape[0])

        def fn():
            rows = np.argpartition(-np.abs(x), k - 1)[:k].astype(np.int32)
            return _core.dense_rows_f16(x2, w16, rows, out)

        nbytes, effort = 2 * k * shape[1], k / shape[0]
    else:
        e = 1e-9 if kind == "select_only" else float(kind.split("_")[1])
        out = np.empty(shape[1], np.float32)
        _, info = pyeffort.matmul(x, b, e, out=out, return_info=True)  # also packs once
        fn, nbytes, effort = (
            (lambda: pyeffort.matmul(x, b, e, out=out)),
            info.bytes_read,
            info.effort,
        )
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
        rates={"gbps": nbytes / 1e9},
    )
    if kind == "numpy_f32" and median is not None:
        # OpenBLAS's worker threads keep spinning for a while after a call: on 2 cores they
        # would take a core from the next kind (our dense product) — let them go to sleep
        time.sleep(1.0)
