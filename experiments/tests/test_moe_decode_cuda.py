"""experiments/model/moe_decode_cuda.py at its tiny shape on the CPU: the plumbing of the GPU
run (the dense path's and the buckets' byte counts, the realised effort, the routing check)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "model" / "moe_decode_cuda.py"


def test_moe_decode_cuda_tiny(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "moe.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--rounds",
                          "2", "--steps", "4", "--out", str(out)], check=False,
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(out.read_text())
    res = json.loads(lines[0])
    kinds = {"dense", "effort_1.0", "effort_0.5", "effort_0.25"}
    assert set(res["tokens_per_s"]) == kinds and all(v > 0 for v in res["tokens_per_s"].values())
    assert all(len(v) == 2 for v in res["tokens_per_s_rounds"].values())
    s = res["shape"]
    attn = s["dim"] * 32 * (s["n_heads"] + s["n_kv_heads"]) * 2  # head_dim 32: q, o, k, v
    expert = 3 * s["dim"] * s["hidden_dim"]
    dense = 2 * s["n_layers"] * (attn + s["n_experts_per_tok"] * expert)  # routed experts only
    mb = res["weight_mb_per_token"]
    assert mb["dense"] == pytest.approx(dense / 1e6, abs=0.01)
    assert mb["effort_1.0"] == pytest.approx(1.25 * mb["dense"], rel=0.01)  # 2.5 bytes a weight
    for e in (1.0, 0.5, 0.25):
        real = res["realised_effort"][f"effort_{e}"]
        assert real == pytest.approx(e, abs=0.02)
        assert mb[f"effort_{e}"] == pytest.approx(real * mb["effort_1.0"], rel=0.03)
    assert res["routing_same_as_dense"]["effort_1.0"] >= 0.9  # same weights, same experts
