"""pytest-benchmark JSON of the bench/ suites -> markdown tables, one per benchmark group (a
shape, or a model), with each row's median time as a ratio to the dense baseline of its own
group (dense f16) and, where the group has one, to the dense 8-bit product (dense q8), under
the machine, date and commit the file records.

    python bench/report.py OUT.json [MORE.json ...]

Files of one thread count (``extra_info["threads"]``) are merged: each benchmark's median is
the median of its files' medians (runs repeated in turn, interleaving the kinds). Given files
of several thread counts it also prints a threads sweep: GB/s and time / dense f16 per kind
and thread count, one table per group.
"""

from __future__ import annotations

import json
import statistics
import sys

OLD_BASELINES = ("dense_f16",)  # files written before extra_info had "baseline"
Q8_BASELINE = "dense_q8"


def group_of(b: dict) -> str:
    e = b.get("extra_info", {})
    return b.get("group") or (f"matmul {e['shape']}" if "shape" in e else b["name"])


def is_baseline(b: dict) -> bool:
    e = b.get("extra_info", {})
    return bool(e.get("baseline", e.get("kind") in OLD_BASELINES))


def kind_of(b: dict) -> str:
    return b.get("extra_info", {}).get("kind", b["name"])


def provenance(data: dict, path: str) -> str:
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    commit = (c.get("id") or "?")[:7] + (" (dirty)" if c.get("dirty") else "")
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    return (
        f"`{path}`: {data.get('datetime', '?')}, commit {commit}, {cpu}, "
        f"{m.get('cpu', {}).get('count', '?')} CPUs, Python {m.get('python_version', '?')}"
    )


def _cell(e: dict, key: str, fmt: str) -> str:
    return fmt.format(e[key]) if key in e else "-"


def table(rows: list[dict]) -> str:
    """Markdown rows of one group; the ratio columns divide by the group's dense f16 baseline
    and, if the group has one, by its dense q8 row."""
    base = [b["stats"]["median"] for b in rows if is_baseline(b)]
    q8 = [b["stats"]["median"] for b in rows if kind_of(b) == Q8_BASELINE]
    head = "| kind | median ms | realised effort | GB/s | tokens/s | time / baseline |"
    lines = [head + (" time / dense q8 |" if q8 else ""), "|---|---:|---:|---:|---:|---:|"]
    lines[1] += "---:|" if q8 else ""
    for b in rows:
        e, t = b.get("extra_info", {}), b["stats"]["median"]
        ratio = f"{t / base[0]:.3f}" if base else "-"
        line = (
            f"| {kind_of(b)} | {t * 1e3:.3f} | {_cell(e, 'effort', '{:.3f}')} "
            f"| {_cell(e, 'gbps', '{:.1f}')} | {_cell(e, 'tokens_per_s', '{:.1f}')} | {ratio} |"
        )
        lines.append(line + (f" {t / q8[0]:.3f} |" if q8 else ""))
    return "\n".join(lines)


def groups_of(data: dict) -> dict[str, list]:
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(group_of(b), []).append(b)
    return groups


def report(data: dict, path: str) -> str:
    out = [provenance(data, path)]
    for name, rows in groups_of(data).items():
        e = rows[0].get("extra_info", {})
        where = f"kernel {e['kernel']}, {e['threads']} threads" if "kernel" in e else ""
        base = "" if any(map(is_baseline, rows)) else " (no dense baseline in this group)"
        out.append(f"\n### {name}{base}\n\n{where}\n\n{table(rows)}".replace("\n\n\n", "\n\n"))
    return "\n".join(out) + "\n"


def threads_of(data: dict):
    for b in data["benchmarks"]:
        if "threads" in b.get("extra_info", {}):
            return b["extra_info"]["threads"]
    return None


def merge(runs: list[dict]) -> dict:
    """Files of one suite and thread count -> one, each benchmark's median (and GB/s) the
    median over the files that have it."""
    if len(runs) == 1:
        return runs[0]
    by_name: dict[str, list] = {}
    for data in runs:
        for b in data["benchmarks"]:
            by_name.setdefault(b["name"], []).append(b)
    benchmarks = []
    for found in by_name.values():
        b = json.loads(json.dumps(found[0]))
        b["stats"]["median"] = statistics.median(f["stats"]["median"] for f in found)
        gbps = [f["extra_info"]["gbps"] for f in found if "gbps" in f.get("extra_info", {})]
        if gbps:
            b["extra_info"]["gbps"] = statistics.median(gbps)
        benchmarks.append(b)
    return {**runs[0], "benchmarks": benchmarks}


def sweep(by_threads: dict) -> str:
    """Per group, kind x thread count: GB/s and time / dense f16 of the same thread count."""
    counts = sorted(by_threads)
    tables: dict[str, dict] = {}
    for n in counts:
        for name, rows in groups_of(by_threads[n]).items():
            base = [b["stats"]["median"] for b in rows if is_baseline(b)]
            for b in rows:
                e, t = b.get("extra_info", {}), b["stats"]["median"]
                cell = _cell(e, "gbps", "{:.1f}") + (f" ({t / base[0]:.2f})" if base else "")
                tables.setdefault(name, {}).setdefault(kind_of(b), {})[n] = cell
    out = ["## Threads sweep: GB/s (time / dense f16)"]
    for name, kinds in tables.items():
        out.append(f"\n### {name}\n")
        out.append("| kind | " + " | ".join(f"{n} threads" for n in counts) + " |")
        out.append("|---|" + "---:|" * len(counts))
        for kind, cells in kinds.items():
            out.append(f"| {kind} | " + " | ".join(cells.get(n, "-") for n in counts) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    runs: dict = {}  # (threads, the file's groups) -> [(path, data)]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs.setdefault((threads_of(data), tuple(groups_of(data))), []).append((path, data))
    sweeps: dict = {}  # the groups -> {threads: merged data}
    for (n, groups), files in runs.items():
        merged = merge([d for _, d in files])
        label = files[0][0] + (f" and {len(files) - 1} more (medians)" if len(files) > 1 else "")
        print(report(merged, label))
        if n is not None:
            sweeps.setdefault(groups, {})[n] = merged
    for by_threads in sweeps.values():
        if len(by_threads) > 1:
            print(sweep(by_threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
