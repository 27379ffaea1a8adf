"""The decode tools of experiments/model that run under torchrun: tp_decode.py on the tiny
shape, two gloo ranks (the GPU runs use the same code with nccl and CUDA graphs)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "model" / "tp_decode.py"


def test_tp_decode_two_gloo_ranks(tmp_path):
    """Rank 0 alone prints one JSON with every kind's tokens/s and the realised effort summed
    over the ranks."""
    pytest.importorskip("torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tp.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), str(SCRIPT), "--tiny", "--threads", "1",
                          "--rounds", "1", "--steps", "4", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(out.read_text())
    res = json.loads(lines[0])
    assert (res["world_size"], res["backend"], res["cuda_graphs"]) == (2, "gloo", False)
    assert set(res["tokens_per_s"]) == {"dense", "effort_1.0", "effort_0.5", "effort_0.25"}
    assert all(v > 0 for v in res["tokens_per_s"].values())
    for e in (1.0, 0.5, 0.25):
        assert res["realised_effort"][f"effort_{e}"] == pytest.approx(e, abs=0.02)
