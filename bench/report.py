"""pytest-benchmark JSON of the bench/ suites -> markdown tables, one per benchmark group (a
shape, or a model), with each row's median time as a ratio to the dense baseline of its own
group, under the machine, date and commit the file records.

    python bench/report.py OUT.json [MORE.json ...]
"""

from __future__ import annotations

import json
import sys

OLD_BASELINES = ("dense_f16",)  # files written before extra_info had "baseline"


def group_of(b: dict) -> str:
    e = b.get("extra_info", {})
    return b.get("group") or (f"matmul {e['shape']}" if "shape" in e else b["name"])


def is_baseline(b: dict) -> bool:
    e = b.get("extra_info", {})
    return bool(e.get("baseline", e.get("kind") in OLD_BASELINES))


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
    """Markdown rows of one group; the ratio column divides by the group's baseline."""
    base = [b["stats"]["median"] for b in rows if is_baseline(b)]
    lines = [
        "| kind | median ms | realised effort | GB/s | tokens/s | time / baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in rows:
        e, t = b.get("extra_info", {}), b["stats"]["median"]
        ratio = f"{t / base[0]:.3f}" if base else "-"
        lines.append(
            f"| {e.get('kind', b['name'])} | {t * 1e3:.3f} | {_cell(e, 'effort', '{:.3f}')} "
            f"| {_cell(e, 'gbps', '{:.1f}')} | {_cell(e, 'tokens_per_s', '{:.1f}')} | {ratio} |"
        )
    return "\n".join(lines)


def report(data: dict, path: str) -> str:
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(group_of(b), []).append(b)
    out = [provenance(data, path)]
    for name, rows in groups.items():
        e = rows[0].get("extra_info", {})
        where = f"kernel {e['kernel']}, {e['threads']} threads" if "kernel" in e else ""
        base = "" if any(map(is_baseline, rows)) else " (no dense baseline in this group)"
        out.append(f"\n### {name}{base}\n\n{where}\n\n{table(rows)}".replace("\n\n\n", "\n\n"))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            print(report(json.load(f), path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
