"""Measured CPU time of one decode token through every hooked matrix of a model, per rule and
effort, side by side with our dense fp16 product (``pyeffort.dense_matmul``) in the same run.

Channel rules (TEAL, WINA) run on the fast kernel for them, ``pyeffort._core.dense_rows_f16``
(dense rows of W for the kept input channels) when the compiled core has it, else on a numpy
stand-in (gather the rows, float32 product), which the result names.
"""

from __future__ import annotations

import time

import numpy as np

import pyeffort


def dense_rows_kernel():
    """(function(x32_2d, w16, rows_int32, out), name)."""
    try:
        from pyeffort import _core

        if hasattr(_core, "dense_rows_f16"):
            return _core.dense_rows_f16, "pyeffort._core.dense_rows_f16"
    except ImportError:
        pass

    def numpy_rows(x32, w16, rows, out):
        out[...] = x32[:, rows] @ w16[rows].astype(np.float32)

    return numpy_rows, "numpy stand-in (gather rows, float32)"


def _channels(x, state, effort, wina: bool):
    k = round(float(effort) * state.n_in)
    score = np.abs(x)
    if wina:
        score = score * state.get("row_norms", lambda: np.linalg.norm(state.w32, axis=1))
    if k <= 0:
        return np.zeros(0, np.int32)
    return np.sort(np.argpartition(-score, k - 1)[:k]).astype(np.int32)


def time_rule(states, xs, rule: str, efforts: dict[str, float] | None, repeat: int = 3) -> float:
    """Median seconds of one token through all matrices. ``xs``: name -> (n_in,) float32."""
    names = list(states)
    outs = {n: np.empty((1, states[n].n_out), np.float32) for n in names}
    rows_fn, _ = dense_rows_kernel()
    prepared = {}
    for n in names:
        prepared[n] = np.ascontiguousarray(xs[n].reshape(1, -1), dtype=np.float32)
    times = []
    for _ in range(repeat + 1):  # the first pass warms up (and is dropped)
        t0 = time.perf_counter()
        for n in names:
            st, x = states[n], prepared[n]
            if rule == "dense":
                pyeffort.dense_matmul(x, st.w16, out=outs[n])
            elif rule in ("pyeffort", "pyeffort_q8", "bucket_twin"):
                pyeffort.matmul(x, st.buckets, efforts[n], out=outs[n])
            elif rule in ("teal", "wina"):
                rows = _channels(x[0], st, efforts[n], rule == "wina")
                rows_fn(x, st.w16, rows, outs[n])
            else:
                raise ValueError(f"no timed kernel for rule {rule!r}")
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def speedups(
    harness, xs, rules_efforts: dict[str, list[float]], allocate: bool = True, repeat: int = 3
) -> dict:
    """{rule: {effort: speed-up over dense}}, plus ``"dense_s"`` and ``"rows_kernel"``."""
    states = harness.states
    for st in states.values():  # build outside the clock
        st.buckets  # noqa: B018
    t_dense = time_rule(states, xs, "dense", None, repeat)
    out: dict = {"dense_s": t_dense, "rows_kernel": dense_rows_kernel()[1]}
    for rule, efforts in rules_efforts.items():
        out[rule] = {}
        for e in efforts:
            a = harness.allocation if (allocate and rule == "pyeffort") else harness.uniform
            t = time_rule(states, xs, rule, a.efforts(e), repeat)
            out[rule][e] = t_dense / t
    return out
