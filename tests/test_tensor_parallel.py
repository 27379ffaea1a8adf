"""Tensor-parallel decoding (pyeffort.models.tensor_parallel) on CPUs over gloo: 2 and 4 ranks
of a tiny random Mistral (8 heads, 4 kv heads) as separate processes, the numpy forward and the
torch one (llama_torch on HostMatmuls), each against the same forward in one process; sharded
conversion; a killed rank; the command line under torchrun. On a GPU (marked cuda): one rank
over nccl, the torch forward in CUDA graphs, against the single-process CUDA model."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from test_cli import TEMPLATE
from test_model_hf import REL_TOL, write_tiny_mistral

pytest.importorskip("torch.distributed")
import torch

from pyeffort.cli import main
from pyeffort.errors import FormatError
from pyeffort.models import load
from pyeffort.models import tensor_parallel as tp
from pyeffort.models.args import ConfigError, config
from pyeffort.models.convert import convert, load_converted, read_manifest
from pyeffort.models.generate import generate

TIMEOUT_S = 120  # the gloo timeout of every run here: a cold start on a loaded 2-core CI machine
PROMPT = [1, 5, 9, 14, 3, 22, 7, 40, 11, 2, 60, 8]

# One rank: prefill and decode logits at 1.0, greedy tokens, then 10 tokens at 0.5 with the
# realised effort reported and this rank's own counters. "die": rank 1 SIGKILLs itself
# after the prefill. The forward: "numpy", or the torch one on "cpu" or "cuda".
WORKER = r"""
import os, signal, sys
import numpy as np
import pyeffort
from pyeffort.models import tensor_parallel as tp
from pyeffort.models.generate import Stats, generate

dst, n, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ids, forward = [int(t) for t in sys.argv[5].split(",")], sys.argv[6]
pyeffort.set_num_threads(1)
if forward != "numpy":
    import torch
    torch.set_num_threads(1)
m = tp.load(dst, n, device=None if forward == "numpy" else forward)
pre = m.forward(ids, 0, 1.0)
if mode == "die" and m.comm.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
steps = np.array([m.forward([t], len(ids) + i, 1.0)[0] for i, t in enumerate(ids[:4])])
greedy = list(generate(m, ids, max_tokens=10, stop=[]))
st = Stats()
half = list(generate(m, ids, max_tokens=10, effort=0.5, stop=[], stats=st))
mults, total = m.counts()
captures = getattr(getattr(m.model, "graph", None), "captures", -1)
np.savez(f"{out}.{m.comm.rank}.npz", pre=pre, steps=steps, greedy=greedy, realised=st.realised,
         mults=mults, total=total, backend=m.comm.backend, captures=captures)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, n: int, port: int) -> dict:
    """What torchrun sets for a worker (one machine)."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYEFFORT_TP_TIMEOUT": str(TIMEOUT_S), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def launch(
    script, dst, n: int, out, mode="run", forward="numpy", env=None
) -> list[subprocess.Popen]:
    port, ids = free_port(), ",".join(map(str, PROMPT))
    return [subprocess.Popen([sys.executable, str(script), str(dst), str(n), str(out), mode, ids,
                              forward], env={**rank_env(r, n, port), **(env or {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(n)]  # fmt: skip


def finish(procs, limit: float = 90) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process; kills them all past ``limit`` seconds."""
    try:
        return [(p.wait(timeout=limit), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, the model converted whole, the worker script)."""
    root = tmp_path_factory.mktemp("tp")
    write_tiny_mistral(root / "hf", heads=(8, 4), hidden=256, chat_template=TEMPLATE)
    convert(root / "hf", root / "one", progress=False)
    for n in (2, 4):
        tp.convert_tp(root / "hf", root / f"tp{n}", n, progress=False)
    (root / "worker.py").write_text(WORKER)
    return root


# ------------------------------------------------------------------------ sharding


def test_shards_are_the_split_matrices(tiny):
    """Each rank's wq/wk/w1 are its columns of the whole matrix, wo/w2 its rows; norms,
    embedding and LM head are whole; the manifest names the shard; partial loading works."""
    whole = {lin.name: lin for lin in load(tiny / "one").linears()}
    parts = [load(tiny / "tp4" / f"rank{r}") for r in range(4)]
    for name, lin in whole.items():
        axis = 0 if name.endswith(("wo", "w2")) else 1
        joined = np.concatenate([{x.name: x for x in p.linears()}[name].dense()
                                 for p in parts], axis=axis)  # fmt: skip
        np.testing.assert_array_equal(joined, lin.dense(), err_msg=name)
    assert parts[3].args.n_heads == 2 and parts[3].args.n_kv_heads == 1
    assert parts[3].args.hidden_dim == 64 and parts[3].args.head_dim == 16
    assert read_manifest(tiny / "tp4" / "rank3")["tp"]["rank"] == 3
    half = load_converted(tiny / "tp4" / "rank1", fraction=0.5)
    assert next(half.linears()).buckets.loaded_fraction == pytest.approx(0.5, abs=0.07)


def test_refuses_splits_that_do_not_fit(tiny):
    args = load(tiny / "one").args  # 8 heads, 4 kv heads, hidden 256
    with pytest.raises(ConfigError, match="does not divide n_kv_heads=4"):
        tp.shard_args(args, 8)
    with pytest.raises(ConfigError, match=r"feed-forward 36\) must be whole groups of 16"):
        tp.shard_args(replace(args, hidden_dim=72), 2)
    with pytest.raises(ConfigError, match="mixture of experts"):
        tp.shard_args(replace(args, n_experts=4, n_experts_per_tok=2), 2)
    smol = tp.shard_args(config("SmolLM2-135M"), 3)  # 9 heads, 3 kv heads of 64
    assert (smol.n_heads, smol.n_kv_heads, smol.hidden_dim, smol.head_dim) == (3, 1, 512, 64)


def test_missing_shard_says_how_to_convert(tiny, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(
        FormatError, match=r"no converted shard rank2: run pyeffort convert .* --tp 3"
    ):
        tp.load(tiny / "tp2", 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--tp 3 but torchrun started 4"):
        tp.load(tiny / "tp2", 3)
    monkeypatch.setenv("PYEFFORT_TP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PYEFFORT_TP_TIMEOUT='soon': give a number of seconds"):
        tp.timeout_from_env()
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 3"):
        tp.load(tiny / "tp2", 3)


# ------------------------------------------------------------------------ ranks as processes


def one_process(path, forward: str):
    """The whole model in this process, with the forward the ranks ran."""
    if forward == "numpy":
        return load(path)
    from pyeffort.models.llama_torch import TorchModel

    return TorchModel(load(path), forward)


@pytest.mark.parametrize("forward", ["numpy", "cpu"])
@pytest.mark.parametrize("n", [2, 4])
def test_ranks_decode_like_one_process(tiny, tmp_path, n, forward):
    """At 1.0 the logits of n ranks equal one process's (the same forward: numpy, or torch on
    the CPU) within the model tests' tolerance and the greedy tokens are the same; at 0.5 every
    rank reports the realised effort of all ranks together, close to 0.5."""
    runs = finish(launch(tiny / "worker.py", tiny / f"tp{n}", n, tmp_path / "out", "run", forward))
    assert [code for code, _ in runs] == [0] * n, runs[0][1][-2000:]
    ranks = [np.load(tmp_path / f"out.{r}.npz") for r in range(n)]
    m = one_process(tiny / "one", forward)
    pre = m.forward(PROMPT, 0, 1.0)
    steps = np.array([m.forward([t], len(PROMPT) + i, 1.0)[0] for i, t in enumerate(PROMPT[:4])])
    greedy = list(generate(m, PROMPT, max_tokens=10, stop=[]))
    for got in ranks:
        for ref, out in ((pre, got["pre"]), (steps, got["steps"])):
            assert np.abs(out - ref).max() <= REL_TOL * np.abs(ref).max()
        assert list(got["greedy"]) == greedy
    summed = sum(float(g["mults"]) for g in ranks) / sum(float(g["total"]) for g in ranks)
    for got in ranks:
        assert float(got["realised"]) == pytest.approx(summed, rel=1e-9)
    assert summed == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("forward", ["numpy", "cpu"])
def test_killed_rank_ends_the_others(tiny, tmp_path, forward):
    """Rank 1 is SIGKILLed after the prefill: rank 0 stops with a clear error, non-zero, within
    the gloo timeout (no hang)."""
    t0 = time.monotonic()
    (code0, err0), (code1, _) = finish(
        launch(tiny / "worker.py", tiny / "tp2", 2, tmp_path / "out", "die", forward),
        limit=TIMEOUT_S + 30,
    )
    assert code1 == -signal.SIGKILL
    assert code0 != 0
    assert "ParallelError: tensor-parallel rank 0 of 2" in err0 and "another rank stopped" in err0
    assert time.monotonic() - t0 < 90  # the closed connection ends it, well before the timeout


# ------------------------------------------------------------------------ the command line


def in_process(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``pyeffort *argv`` run in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_under_torchrun(tiny, capsys):
    """torchrun --nproc-per-node 2 -m pyeffort generate --tp 2: rank 0 alone prints, the text
    of one process; convert --tp refuses a split that does not fit; --tp outside torchrun, or
    shards without --tp, say how to launch; --tp refuses Metal and the effort LM head."""
    base = ["generate", "the cat sat", "--raw", "--max-tokens", "8", "--json"]
    env = {**os.environ, "PYEFFORT_TP_TIMEOUT": str(TIMEOUT_S), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "pyeffort", *base, "--model",
                          str(tiny / "tp2"), "--tp", "2", "--threads", "1"],
                         check=False, capture_output=True, text=True, timeout=90, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in run.stdout.splitlines() if x.strip()]
    assert len(lines) == 1  # rank 1 printed nothing
    _, one, _ = in_process(capsys, *base, "--model", str(tiny / "one"))
    assert json.loads(lines[0])["text"] == json.loads(one)["text"]
    code, _, err = in_process(capsys, "convert", str(tiny / "hf"), str(tiny / "tp3"), "--tp", "3")
    assert code == 2 and "--tp 3 does not divide n_heads=8" in err
    assert not (tiny / "tp3").exists()
    code, _, err = in_process(capsys, *base, "--model", str(tiny / "tp2"), "--tp", "2")
    assert code == 2 and "torchrun --nproc-per-node 2" in err
    code, _, err = in_process(capsys, *base, "--model", str(tiny / "tp2"))
    assert code == 2 and "holds tensor-parallel shards: run torchrun --nproc-per-node 2" in err
    code, _, err = in_process(capsys, *base, "--model", str(tiny / "tp2"), "--tp", "2",
                              "--device", "metal")  # fmt: skip
    assert code == 2 and "--tp runs on cpu or cuda with a dense LM head: drop --device metal" in err
    code, _, err = in_process(capsys, *base, "--model", str(tiny / "tp2"), "--tp", "2",
                              "--effort-head")  # fmt: skip
    assert code == 2 and "drop --effort-head" in err


def test_chat_rank_zero_reads_for_all(tiny, capsys, monkeypatch):
    """chat --tp 2: rank 0 reads the lines (rank 1's stdin is closed) and alone prints; the
    conversation, /effort included, is the one of a single process."""
    lines = "hello there\n/effort 0.5\nthe cat\n"
    cmd = ["chat", "--max-tokens", "6"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "pyeffort", *cmd, "--threads", "1",
                               "--model", str(tiny / "tp2"), "--tp", "2"],
                              env=rank_env(r, 2, port), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              stdin=subprocess.PIPE if r == 0 else subprocess.DEVNULL)
             for r in range(2)]  # fmt: skip
    try:
        outs = [p.communicate(lines if r == 0 else None, timeout=60) for r, p in enumerate(procs)]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    _, one, _ = in_process(capsys, *cmd, "--model", str(tiny / "one"))
    assert outs[0][0] == one and outs[1] == ("", "")
    assert "effort asked 0.500, realised 0.500" in outs[0][1]


# ------------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_one_gpu_rank_over_nccl(tiny, tmp_path):
    """One rank over nccl (world size 1, as torchrun --nproc-per-node 1): the torch forward on
    the GPU, each decoded token one CUDA graph holding its all-reduces (one capture), gives the
    single-process CUDA model's logits and greedy tokens; the realised effort at 0.5 is
    reported."""
    from test_model_cuda import REL_TOL as CUDA_TOL

    tp.convert_tp(tiny / "hf", tmp_path / "tp1", 1, progress=False)
    gpus = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    runs = finish(launch(tiny / "worker.py", tmp_path / "tp1", 1, tmp_path / "out", "run",
                         "cuda", gpus))  # fmt: skip
    assert runs[0][0] == 0, runs[0][1][-2000:]
    got = np.load(tmp_path / "out.0.npz")
    assert str(got["backend"]) == "nccl" and int(got["captures"]) == 1
    m = one_process(tiny / "one", "cuda")
    pre = m.forward(PROMPT, 0, 1.0)
    steps = np.array([m.forward([t], len(PROMPT) + i, 1.0)[0] for i, t in enumerate(PROMPT[:4])])
    for ref, out in ((pre, got["pre"]), (steps, got["steps"])):
        assert np.abs(out - ref).max() <= CUDA_TOL * np.abs(ref).max()
    assert list(got["greedy"]) == list(generate(m, PROMPT, max_tokens=10, stop=[]))
    assert float(got["realised"]) == pytest.approx(0.5, abs=0.02)
