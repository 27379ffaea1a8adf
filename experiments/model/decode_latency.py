"""Per-token decode latency of the default model at several efforts, interleaved in one process
(20th percentile and median, ms; the prefill token dropped), each repeat's efforts side by side
(per repeat, the ratio of tokens/s from one effort to the next lower one: a paired measurement
that the machine's slow drifts cancel out of), and with ``--by-call`` the time per
``pyeffort.matmul`` / ``matmul_group`` call by matrix shape.

    python experiments/model/decode_latency.py --threads 1 --efforts 1.0,0.5,0.25 --tokens 32 --repeats 2
    python experiments/model/decode_latency.py --threads 2 --by-call
    python experiments/model/decode_latency.py --threads 2 --values f16,q8 --repeats 5

``--values f16,q8``: the default model with fp16 and with 8-bit bucket values (the same build,
its values quantised as ``build_buckets(values="q8")`` does), every (values, effort) pair in
each repeat, and per effort the paired ratio of tokens/s q8 over f16.

To compare two builds, run it from two checkouts in turns (``PYEFFORT_SRC=/path/to/checkout``
imports pyeffort from there instead of the installed one): on a shared VM the same command
moves by 10-30% between processes, so only alternating runs are compared.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import time

if os.environ.get("PYEFFORT_SRC"):  # another checkout's build, ahead of an editable install
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, os.environ["PYEFFORT_SRC"])

import numpy as np

import pyeffort
from pyeffort import models
from pyeffort.models import effort_linear
from pyeffort.models.generate import generate


def token_times(model, ids, effort: float, n: int) -> list[float]:
    """Seconds per decoded token (the first, which includes the prefill, dropped)."""
    ts, t = [], time.perf_counter()
    for _ in generate(model, ids, max_tokens=n, effort=effort, stop=[]):
        t2 = time.perf_counter()
        ts.append(t2 - t)
        t = t2
    return ts[1:]


def timed_calls(acc: dict, cnt: collections.Counter) -> None:
    """Wraps the matmul entry points the model calls, adding seconds per shape key to acc."""
    one, group = pyeffort.matmul, pyeffort.matmul_group

    def matmul(x, B, e, **kw):
        t = time.perf_counter()
        r = one(x, B, e, **kw)
        key = (B.shape,)
        acc[key] += time.perf_counter() - t
        cnt[key] += 1
        return r

    def matmul_group(x, Bs, e, **kw):
        t = time.perf_counter()
        r = group(x, Bs, e, **kw)
        key = tuple(B.shape for B in Bs)
        acc[key] += time.perf_counter() - t
        cnt[key] += 1
        return r

    effort_linear.pyeffort.matmul = matmul
    effort_linear.pyeffort.matmul_group = matmul_group


def with_values(model, values: str):
    """The model with its matrices' bucket values of that kind (q8: quantised in place)."""
    from pyeffort import reference

    if values == "f16":
        return model
    for lin in model.linears():
        b = lin.buckets
        q, scales = reference.quantise_q8(np.asarray(b.values), np.asarray(b.order))
        lin.buckets = pyeffort.Buckets(q, b.positions, b.stats, b.order, b.n_out, b.source_dtype,
                                       b.stat, scales=scales)  # fmt: skip
        lin.w16 = None  # the prefill's dense copy follows the new values
        pyeffort.prepare(lin.buckets)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--efforts", default="1.0,0.5,0.25")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--by-call", action="store_true", help="time per matmul call by shape")
    ap.add_argument("--label", default="")
    ap.add_argument("--values", default="", help="f16,q8: both value kinds, paired")
    a = ap.parse_args()
    pyeffort.set_num_threads(a.threads)
    if a.values:
        return compare_values(a)
    model = models.load(progress=False)
    ids = model.tokenizer.encode("The history of the city began")
    efforts = [float(e) for e in a.efforts.split(",")]
    for e in efforts:  # warm-up: first-use copies, caches
        token_times(model, ids, e, 4)
    acc: dict = collections.defaultdict(float)
    cnt: collections.Counter = collections.Counter()
    if a.by_call:
        timed_calls(acc, cnt)
    res: dict[float, list[float]] = {e: [] for e in efforts}
    rounds: list[dict[float, float]] = []  # per repeat: effort -> median seconds per token
    per_call: dict[float, dict] = {}
    for r in range(a.repeats):
        rounds.append({})
        for e in efforts[r % len(efforts) :] + efforts[: r % len(efforts)]:  # rotated
            acc.clear()
            cnt.clear()
            ts = token_times(model, ids, e, a.tokens)
            res[e].extend(ts)
            rounds[-1][e] = float(np.median(ts))
            per_call[e] = {k: (acc[k] / cnt[k], cnt[k]) for k in acc}
    cols = [
        f"{e}: p20 {np.percentile(res[e], 20) * 1e3:.1f} med {np.median(res[e]) * 1e3:.1f}"
        for e in efforts
    ]
    print(f"{a.label} threads {a.threads} ms/token  " + "  ".join(cols), flush=True)
    for lo, hi in itertools.pairwise(efforts):  # paired: each repeat's medians side by side
        up = [rd[lo] / rd[hi] for rd in rounds]  # > 1: tokens/s rose from lo to hi effort
        print(f"  tokens/s at {hi:g} over {lo:g}, per repeat: "
              + " ".join(f"{u:.2f}" for u in up)
              + f" (median {np.median(up):.3f}; higher in {sum(u > 1 for u in up)} of {len(up)})")  # fmt: skip
    for e in efforts if a.by_call else []:
        for k, (s, n) in sorted(per_call[e].items(), key=str):
            print(f"  effort {e} {k}: {s * 1e6:.0f} us per call, {n} calls")


def compare_values(a) -> None:
    """Each repeat runs every (values, effort) pair, rotated; per effort the paired ratio of
    tokens/s with the second value kind over the first."""
    kinds = a.values.split(",")
    efforts = [float(e) for e in a.efforts.split(",")]
    ms = {k: with_values(models.load(progress=False), k) for k in kinds}
    ids = ms[kinds[0]].tokenizer.encode("The history of the city began")
    pairs = [(k, e) for e in efforts for k in kinds]
    for k, e in pairs:  # warm-up
        token_times(ms[k], ids, e, 4)
    rounds: list[dict] = []
    for r in range(a.repeats):
        rounds.append({})
        for k, e in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:
            rounds[-1][k, e] = float(np.median(token_times(ms[k], ids, e, a.tokens)))
    for e in efforts:
        med = {k: np.median([rd[k, e] for rd in rounds]) for k in kinds}
        up = [rd[kinds[0], e] / rd[kinds[1], e] for rd in rounds]  # > 1: the second is faster
        print(f"{a.label} threads {a.threads} effort {e:g}: "
              + "  ".join(f"{k} {1 / med[k]:.1f} tok/s" for k in kinds)
              + f"  | {kinds[1]} over {kinds[0]} per repeat: " + " ".join(f"{u:.2f}" for u in up)
              + f" (median {np.median(up):.3f}; faster in {sum(u > 1 for u in up)} of {len(up)})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
