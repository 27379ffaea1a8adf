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
