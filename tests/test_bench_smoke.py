"""The benchmark suites run: ``pytest bench --benchmark-disable`` (every benchmark once, on
the smallest shape of each suite), and bench/report.py turns a suite's JSON into tables of
ratios within each group."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_bench_smoke_run_passes():
    pytest.importorskip("pytest_benchmark")
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "--benchmark-disable"]
    cmd += ["-p", "no:cacheprovider", "-k", "not cuda"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _bench(name, group, kind, median, baseline, **info):
    extra = {"kind": kind, "baseline": baseline, **info}
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": extra}


def test_report_divides_by_the_baseline_of_the_same_group(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    data = {
        "datetime": "2026-12-07T00:00:00",
        "machine_info": {"cpu": {"brand_raw": "CPU", "count": 2}, "python_version": "3.11"},
        "commit_info": {"id": "abcdef123", "dirty": False},
        "benchmarks": [
            _bench("a", "matmul 8x8", "dense_f16", 2e-3, True, effort=1.0),
            _bench("b", "matmul 8x8", "effort_0.5", 1e-3, False, effort=0.5),
            _bench("c", "matmul 4x4", "dense_f16", 4e-3, True, effort=1.0),
            _bench("d", "matmul 4x4", "effort_0.5", 6e-3, False, effort=0.5),
            _bench("e", "decode m", "effort_1.0", 5e-2, False, tokens_per_s=20.0),
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "commit abcdef1" in out and "2026-12-07" in out
    assert "| effort_0.5 | 1.000 | 0.500 | - | - | 0.500 |" in out  # 1 ms / 2 ms
    assert "| effort_0.5 | 6.000 | 0.500 | - | - | 1.500 |" in out  # 6 ms / 4 ms
    assert "### decode m (no dense baseline in this group)" in out and "| 20.0 |" in out


def _file(tmp_path, name, threads, medians):
    """A matmul suite file at threads: {kind: median seconds} in one group."""
    benches = [
        _bench(f"t[{k}]", "matmul 8x8", k, m, k == "dense_f16", threads=threads, gbps=1e-3 / m)
        for k, m in medians.items()
    ]
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": benches}))
    return str(path)


def test_report_gives_ratios_to_dense_q8_merges_runs_and_sweeps_threads(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    kinds = ("dense_f16", "dense_q8", "effort_0.5")
    one = _file(tmp_path, "a.json", 1, dict(zip(kinds, (4e-3, 2e-3, 3e-3))))
    one_again = _file(tmp_path, "b.json", 1, dict(zip(kinds, (6e-3, 2e-3, 5e-3))))
    two = _file(tmp_path, "c.json", 2, dict(zip(kinds, (2e-3, 1e-3, 1e-3))))
    assert report.main([one, one_again, two]) == 0
    out = capsys.readouterr().out
    assert "| GB/s | tokens/s | time / baseline | time / dense q8 |" in out
    # 1 thread: the medians of the two files (5 ms, 2 ms, 4 ms): 4 / 5 and 4 / 2; GB/s the
    # median of 1/3 and 1/5
    assert "a.json and 1 more (medians)" in out
    assert "| effort_0.5 | 4.000 | - | 0.3 | - | 0.800 | 2.000 |" in out
    assert "| effort_0.5 | 1.000 | - | 1.0 | - | 0.500 | 1.000 |" in out  # 2 threads
    assert "## Threads sweep" in out and "| kind | 1 threads | 2 threads |" in out
    assert "| dense_q8 | 0.5 (0.40) | 1.0 (0.50) |" in out
