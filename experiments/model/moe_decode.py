"""Decode of the Mixtral-shaped random model of bench/test_moe_decode_speed.py, its kinds (the
dense fp16 path with the same routing, and efforts 1.0 / 0.5 / 0.25) interleaved in one process:
each repeat times every kind over the same tokens (rotated order), so the paired ratios to the
dense path hold on a machine shared with other jobs. Prints per kind the median ms per token,
tokens/s, realised effort, weight bytes read per token, and per repeat the time over dense.
``--clock cpu`` times process CPU time instead of wall time (with ``--threads 1``: what the
decode itself costs on a machine whose cores other jobs share).

    python experiments/model/moe_decode.py --repeats 7 --tokens 16
    python experiments/model/moe_decode.py --threads 1 --clock cpu
    python experiments/model/moe_decode.py --dim 4096 --hidden 14336 --layers 2  # Mixtral-8x7B
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from test_moe_decode_speed import (  # noqa: E402
    N_LAYERS, PROMPT, SHAPES, bytes_read, dense, random_mixtral,
)

import pyeffort  # noqa: E402
from pyeffort import _core  # noqa: E402

KINDS = ["dense_f16", "effort_1.0", "effort_0.5", "effort_0.25"]
CLOCK = time.perf_counter


def run(model, kind: str, tokens: list[int]) -> float:
    """Median seconds per decoded token of ``kind`` over ``tokens``, each at position PROMPT."""
    effort = 1.0 if kind == "dense_f16" else float(kind.split("_")[1])
    for lin in model.linears():
        lin.hook = dense if kind == "dense_f16" else None
    ts = []
    try:
        for t in tokens:
            t0 = CLOCK()
            model.forward([t], PROMPT, effort, last_only=True)
            ts.append(CLOCK() - t0)
    finally:
        for lin in model.linears():
            lin.hook = None
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per kind and repeat")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--dim", type=int, default=max(SHAPES)[0])
    ap.add_argument("--hidden", type=int, default=max(SHAPES)[1])
    ap.add_argument("--layers", type=int, default=N_LAYERS)
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        pyeffort.set_num_threads(a.threads)
    shape = (a.dim, a.hidden)
    model = random_mixtral(shape, a.layers)
    rng = np.random.default_rng(1)
    model.forward(rng.integers(0, model.args.vocab_size, PROMPT), 0, 1.0)  # the prompt
    tokens = rng.integers(0, model.args.vocab_size, a.tokens).tolist()
    info = {}
    for kind in KINDS:  # warm-up, bytes per token and realised effort over the same tokens
        effort = 1.0 if kind == "dense_f16" else float(kind.split("_")[1])
        it = iter(tokens)
        nbytes = [bytes_read(model, lambda: model.forward([next(it)], PROMPT, effort), kind
                             == "dense_f16") for _ in tokens]  # fmt: skip
        model.reset_counters()
        run(model, kind, tokens)
        info[kind] = (float(np.mean(nbytes)), model.realised_effort())
    rounds = []
    for r in range(a.repeats):
        order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
        rounds.append({k: run(model, k, tokens) for k in order})
    print(f"Mixtral-shaped dim {shape[0]} hidden {shape[1]}, 8 experts top-2, {a.layers} layers; "
          f"kernel {_core.kernel_name()}, {_core.num_threads()} threads, {a.repeats} repeats x "
          f"{a.tokens} tokens, {a.clock} time")  # fmt: skip
    print("| kind | ms/token (median) | tokens/s | realised effort | MB read/token | time / dense "
          "(median of repeats; per repeat) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    for k in KINDS:
        ms = np.median([rd[k] for rd in rounds]) * 1e3
        ratios = [rd[k] / rd["dense_f16"] for rd in rounds]
        nbytes, realised = info[k]
        print(f"| {k} | {ms:.1f} | {1e3 / ms:.1f} | "
              + ("-" if k == "dense_f16" else f"{realised:.3f}")
              + f" | {nbytes / 1e6:.1f} | {np.median(ratios):.2f} ("
              + " ".join(f"{x:.2f}" for x in ratios) + ") |")  # fmt: skip
    for lo, hi in itertools.pairwise(KINDS[1:]):
        up = [rd[lo] / rd[hi] for rd in rounds]
        print(f"tokens/s at {hi} over {lo}: median {np.median(up):.3f}, "
              f"higher in {sum(u > 1 for u in up)} of {len(up)}")  # fmt: skip


if __name__ == "__main__":
    main()
