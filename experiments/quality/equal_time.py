"""Equal-time table: speed-ups over our dense fp16 product measured on one shape (a JSON of
bench/test_matmul_speed.py) with the KL each rule costs on the default model (a quality.json
of ``pyeffort eval``), both interpolated (KL in log) at speed-ups 1.5x, 2x and 3x.

    python experiments/quality/equal_time.py experiments/results/matmul_zen4_2t.json \
        experiments/results/quality.json 4096x14336
"""

import itertools
import json
import math
import sys


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def speedups(path: str, shape: str) -> tuple[list, list]:
    """(effort, speed-up) of the effort matmul and of channel skipping, on one shape."""
    rows = {}
    for b in _load(path)["benchmarks"]:
        e = b["extra_info"]
        if e["shape"] == shape:
            rows[e["kind"]] = (b["stats"]["median"], e["effort"])
    dense = rows["dense_f16"][0]
    pick = lambda prefix: sorted(
        (e, dense / t) for k, (t, e) in rows.items() if k.startswith(prefix)
    )
    return pick("effort_"), pick("channels_")


def kl_curve(path: str, rule: str) -> list:
    """(realised effort, KL) of one rule on the default model; for "pyeffort" only the default's
    rows (label "(e) ..."), not the variants merged beside them ((e'), (e-6))."""
    rows = [r for r in _load(path)["results"] if r["rule"] == rule]
    if rule == "pyeffort":
        rows = [r for r in rows if r.get("label", "(e)").startswith("(e) ")]
    return sorted((r["realised"], r["kl"]) for r in rows)


def kl_at(points: list, x: float | None) -> float | None:
    """KL at effort x: linear in effort, logarithmic in KL; None outside the measured range."""
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x is not None and x0 <= x <= x1:
            t = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def effort_at(points: list, s: float) -> float | None:
    """The effort at which the measured speed-up is s (linear between measured points)."""
    for (e0, s0), (e1, s1) in itertools.pairwise(points):
        if min(s0, s1) <= s <= max(s0, s1) and s0 != s1:
            return e0 + (s - s0) * (e1 - e0) / (s1 - s0)
    return None


def main(results: str, quality: str, shape: str) -> None:
    ours, chan = speedups(results, shape)
    default, teal, wina = (kl_curve(quality, r) for r in ("pyeffort", "teal", "wina"))
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"
    print(f"speed-ups on {shape} (`{results}`), KL on the default model (`{quality}`)\n")
    print("| speed-up over dense fp16 | pyeffort effort | pyeffort KL | channels kept | "
          "TEAL KL | WINA KL |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for s in (1.5, 2.0, 3.0):
        e, f = effort_at(ours, s), effort_at(chan, s)
        print(f"| {s:g}x | {fmt(e, 2)} | {fmt(kl_at(default, e))} | {fmt(f, 2)} | "
              f"{fmt(kl_at(teal, f))} | {fmt(kl_at(wina, f))} |")  # fmt: skip
    print("\nmeasured speed-ups: pyeffort " + ", ".join(f"{e:.2f}: {s:.2f}x" for e, s in ours)
          + "; channels " + ", ".join(f"{e:.2f}: {s:.2f}x" for e, s in chan))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
