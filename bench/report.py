"""pytest-benchmark JSON of bench/test_matmul_speed.py -> the markdown table of bench/README.md:
median time, realised effort, GB/s, and time as a fraction of our dense fp16 time."""

import json
import sys


def main(path: str) -> None:
    rows = {}
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    for b in benchmarks:
        e = b["extra_info"]
        rows.setdefault(e["shape"], {})[e["kind"]] = (b["stats"]["median"], e)
    print("| shape | kind | median ms | realised effort | GB/s | time / dense f16 |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, kinds in rows.items():
        dense = kinds.get("dense_f16", (float("nan"), None))[0]
        for kind, (t, e) in kinds.items():
            print(
                f"| {shape} | {kind} | {t * 1e3:.3f} | {e['effort']:.3f} | {e['gbps']:.1f} |"
                f" {t / dense:.3f} |"
            )
    first = next(iter(rows.values()))
    e = next(iter(first.values()))[1]
    print(f"\nkernel {e['kernel']}, {e['threads']} threads")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json")
