"""Tensor-parallel decode tokens/s of a Mistral-7B-shaped random model (issue 24, item 5), one
run per GPU count under torchrun: each rank builds its own shard's random weights (the narrower
config of ``tensor_parallel.shard_args``: 32/N heads, 8/N kv heads, 14336/N feed-forward), then
times batch-1 decode from a filled KV cache at each effort and the dense tensor-parallel twin
(the same torch module over the shard's dense fp16 weights through cuBLAS, as
bench/test_cuda_decode.py's dense path), both with the all-reduce of wo's and down's partial sums
(``Comm.reduce``, nccl, fp16 activations) and each token one CUDA graph holding them. The kinds
are interleaved (each round in a rotated order); medians are reported. Rank 0 prints one JSON
line (and writes it to ``--out``): tokens/s and the speed-up over dense per kind, the realised
effort summed over the ranks, the world size, the card, and ``graph_vs_eager`` (the relative
difference of one captured step's logits from the same step run eagerly: the captured
collectives did their sums).

    torchrun --nproc-per-node 1 experiments/model/tp_decode.py --out tp1.json
    torchrun --nproc-per-node 2 experiments/model/tp_decode.py --out tp2.json
    torchrun --nproc-per-node 4 experiments/model/tp_decode.py --out tp4.json --values q8
    torchrun --nproc-per-node 2 experiments/model/tp_decode.py --tiny  # CPU, gloo, a tiny shape

On the CPU (``--device cpu``, or no GPU) the same module runs eagerly over gloo: the effort
matrices through pyeffort.matmul (HostMatmuls), the dense twin through torch float32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from test_cuda_decode import QKV_CT, DenseMatmuls, ShapeOnly, host_model

import pyeffort
from pyeffort.models import config
from pyeffort.models import tensor_parallel as tp
from pyeffort.models.args import tensor_shape
from pyeffort.models.llama_torch import CudaMatmuls, HostMatmuls, Transformer

NAMES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # Model.linears() order in a layer
TINY = {"dim": 256, "n_heads": 8, "n_kv_heads": 4, "head_dim": 32, "hidden_dim": 512,
        "vocab_size": 512, "n_layers": 2}  # fmt: skip


def model_args(a):
    """The whole model's config: Mistral-7B's (``--layers`` of them) or the tiny one."""
    base = config("Mistral-7B-v0.1")  # its sliding window (4096) is longer than the cache here
    return replace(base, **TINY) if a.tiny else replace(base, n_layers=a.layers)


def shard_linears(args, gen, device) -> list[torch.Tensor]:
    """One rank's random weights (n_out, n_in) float16 in Model.linears() order, std ~
    1/sqrt(n_in of the whole matrix) with log-normal per-input scales (test_cuda_decode's)."""
    out = []
    for _ in range(args.n_layers):
        for name in NAMES:
            n_in, n_out = tensor_shape(args, name)
            chan = torch.exp(0.5 * torch.randn(n_in, generator=gen, device=device))
            w = torch.randn((n_out, n_in), generator=gen, device=device) * (chan / n_in**0.5)
            out.append(w.half())
    return out


def effort_matmuls(args, ws, values: str, device):
    """The shard's effort matrices: CudaBuckets built on the GPU, or host Buckets."""
    if device.type == "cuda":
        from pyeffort import cuda

        mats = [cuda.build_buckets(w.t(), values=values, ct=QKV_CT if k % 7 < 3 else None)
                for k, w in enumerate(ws)]  # fmt: skip
        model = host_model(args, mats)
        return model, CudaMatmuls(model, device, torch.float16)
    mats = [pyeffort.build_buckets(w.t().numpy(), values=values) for w in ws]
    model = host_model(args, mats)
    return model, HostMatmuls(model)


def dense_matmuls(args, ws, dtype, device):
    """The dense twin: the shard's weights as they are (float32 on the CPU)."""
    model = host_model(args, [ShapeOnly(w) for w in ws])
    head = torch.from_numpy(np.ascontiguousarray(model.lm_head.T)).to(device, dtype)
    return model, DenseMatmuls([w.to(dtype) for w in ws], head)


class Eager:
    """GraphDecoder's call, run eagerly: ``step(token, pos) -> logits (1, vocab)``."""

    def __init__(self, net):
        self.net = net

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        dev = self.net.device
        with torch.no_grad():
            return self.net(torch.tensor([token], device=dev), torch.tensor([pos], device=dev),
                            last_only=True)  # fmt: skip


def build(model, mm, a, comm, dtype, gen):
    """(net, step): the module over ``mm`` with a filled KV cache of ``a.ctx`` positions."""
    net = Transformer(model, mm, capacity=a.ctx + a.steps + 8, dtype=dtype, device=comm.device
                      or "cpu", reduce=comm.reduce)  # fmt: skip
    for b in net.layers:
        for c in (b.attn.k_cache, b.attn.v_cache):
            fill = torch.randn(c[:, : a.ctx].shape, generator=gen, device=c.device)
            c[:, : a.ctx] = fill.to(c.dtype)
    if net.device.type == "cuda" and not a.eager:
        from pyeffort.models.cuda_graph import GraphDecoder

        return net, GraphDecoder(net)
    return net, Eager(net)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(net, step, effort, a) -> tuple[float, tuple[int, int]]:
    """(tokens/s of a.steps decoded tokens from position a.ctx, this rank's counts of them)."""
    net.mm.set_effort(effort)
    for i in range(3):
        step(7, a.ctx + i)
    net.mm.reset_counters()
    sync(net.device)
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(7 + i, a.ctx + i)
    sync(net.device)
    dt = time.perf_counter() - t0
    if hasattr(net.mm, "tokens"):  # counted on the device: the host counts tokens
        net.mm.tokens += a.steps
    counts = net.mm.counts() if hasattr(net.mm, "counts") else (0, 0)
    return a.steps / dt, counts


def graph_vs_eager(net, step) -> float | None:
    """max |captured step's logits - the eager step's| / max |eager's|, at effort 1.0."""
    if isinstance(step, Eager):
        return None
    net.mm.set_effort(1.0)
    ref = Eager(net)(11, 0).float().clone()
    got = step(11, 0).float().clone()
    return float((got - ref).abs().max() / ref.abs().max())


def run(a) -> dict:
    n = int(os.environ.get("WORLD_SIZE", "0"))
    tp.world(n)  # under torchrun
    on_gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    comm = tp.Comm(n, cuda=on_gpu)
    dev = comm.device or torch.device("cpu")
    if a.threads:
        pyeffort.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
    args = tp.shard_args(model_args(a), n)
    dtype = torch.float16 if on_gpu else torch.float32
    gen = torch.Generator(device=dev).manual_seed(1 + comm.rank)  # each rank its own shard
    ws = shard_linears(args, gen, dev)
    nets = {"dense": build(*dense_matmuls(args, ws, dtype, dev), a, comm, dtype, gen)}
    model, mm = effort_matmuls(args, ws, a.values, dev)
    nets["effort"] = build(model, mm, a, comm, dtype, gen)
    check = graph_vs_eager(*nets["effort"])
    kinds = ["dense"] + [f"effort_{e}" for e in a.efforts]
    tps: dict[str, list[float]] = {k: [] for k in kinds}
    counts: dict[str, np.ndarray] = {}
    for r in range(a.rounds):  # a machine's slow drifts then hit every kind alike
        for k in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            e = 1.0 if k == "dense" else float(k.split("_")[1])
            speed, c = timed(*nets["dense" if k == "dense" else "effort"], e, a)
            tps[k].append(speed)
            counts[k] = np.array(c, np.float64)
    med = {k: statistics.median(v) for k, v in tps.items()}
    real = {}
    for k in kinds[1:]:  # summed over the ranks (one collective each, on every rank)
        done, total = comm.all_reduce(counts[k])
        real[k] = round(done / total, 4) if total else None
    full = model_args(a)
    return {
        "world_size": n, "backend": comm.backend, "card": card(dev), "values": a.values,
        "dtype": str(dtype).replace("torch.", ""), "cuda_graphs": check is not None,
        "shape": {k: getattr(full, k) for k in ("n_layers", "dim", "hidden_dim", "n_heads",
                                                 "n_kv_heads", "vocab_size")},
        "ctx": a.ctx, "steps": a.steps, "rounds": a.rounds,
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "speedup_over_dense": {k: round(med[k] / med["dense"], 3) for k in kinds[1:]},
        "realised_effort": real, "graph_vs_eager": check,
        "tokens_per_s_rounds": {k: [round(x, 2) for x in v] for k, v in tps.items()},
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if on_gpu else None,
    }  # fmt: skip


def card(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def write(path: str, res: dict) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def decode_args(doc: str, layers: int, layers_help: str, tiny, rounds: int):
    """The options this script and moe_decode_cuda.py share."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=layers, help=layers_help)
    ap.add_argument("--tiny", action="store_true", help=f"a tiny shape instead: {tiny}")
    ap.add_argument("--values", choices=["f16", "q8"], default="f16")
    ap.add_argument("--efforts", type=lambda s: [float(x) for x in s.split(",")],
                    default=[1.0, 0.5, 0.25])  # fmt: skip
    ap.add_argument("--ctx", type=int, default=1024, help="filled KV cache positions")
    ap.add_argument("--steps", type=int, default=64, help="timed tokens per kind and round")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return ap


def main() -> None:
    ap = decode_args(__doc__, 32, "Mistral-7B's 32, or fewer", TINY, 3)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs on the GPU")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per rank; 0: default")
    ap.add_argument("--out", default=None, help="also write the JSON here (rank 0)")
    a = ap.parse_args()
    if a.tiny:
        a.ctx, a.steps = min(a.ctx, 64), min(a.steps, 16)
    res = run(a)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(res))
        if a.out:
            write(a.out, res)


if __name__ == "__main__":
    main()
