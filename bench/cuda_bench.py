"""Effort matmul on the GPU against cuBLAS (torch.nn.functional.linear), both in CUDA graphs,
with enough weight sets rotated that L2 holds none of them. Prints a table; --json writes it.

    python bench/cuda_bench.py [--json out.json] [--shapes 4096x14336,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import pyeffort
from pyeffort import cuda

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (n_in, n_out)
EFFORTS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1]
ROTATE_BYTES = 480e6  # weight bytes cycled per graph: 8x the 60 MB L2


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(10):
        b.copy_(a)
    t1.record()
    torch.cuda.synchronize()
    return 2 * n_bytes * 10 / (t0.elapsed_time(t1) * 1e-3) / 1e9


def graph_of(calls) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def time_graph(g, n_calls: int, reps: int = 30) -> float:
    """Median µs per call over reps replays of a graph of n_calls calls."""
    for _ in range(3):
        g.replay()
    ev = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) * 1e3 / n_calls for a, b in ev)
    return ts[len(ts) // 2]


PHASES = [  # (name, from stamp, to stamp): globaltimer stamps written by the kernels
    ("k1_launch_wait", 8, 9),
    ("k1_body", 9, 10),
    ("k1_to_k2", 10, 11),
    ("k2_wait", 11, 12),
    ("k2_hist_load", 12, 20),
    ("k2_pick_b1", 20, 15),
    ("k2_scan", 15, 13),
    ("k2_to_k3", 13, 0),
    ("k3_wait", 0, 1),
    ("k3_state_load", 1, 16),
    ("k3_cand_load", 16, 17),
    ("k3_l2_hist", 17, 18),
    ("k3_l2_pick", 18, 19),
    ("k3_l3", 19, 2),
    ("k3_dispatch_scan", 2, 3),
    ("k3_rows_b0", 3, 4),
    ("k3_team_sum", 4, 5),
    ("k3_ticket", 5, 6),
    ("k3_all_splits_done", 8, 14),
    ("total", 8, 7),
]


def profile(bs, xs, e):
    """Phase times (µs) of one call inside a graph, from the kernels' globaltimer stamps."""
    bs[0].profile(True)
    g = graph_of(
        [lambda: pyeffort.matmul(xs[1], bs[1], e), lambda: pyeffort.matmul(xs[0], bs[0], e)]
    )
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    st = bs[0].timing.cpu().tolist()
    bs[0].profile(False)
    return {k: round((st[b] - st[a]) / 1e3, 2) for k, a, b in PHASES}


def bench_shape(n_in, n_out, efforts, gen, pdl_check=False):
    dense_bytes = 2 * n_in * n_out
    n_sets = max(2, math.ceil(ROTATE_BYTES / dense_bytes))
    per_graph = max(n_sets, 24)
    t0 = time.time()
    ws, bs, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, n_out), generator=gen, device="cuda") * 0.02).half()
        bs.append(cuda.build_buckets(w))
        ws.append(w.t().contiguous())  # nn.Linear layout (n_out, n_in)
        del w
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys.append(torch.empty(n_out, dtype=torch.float16, device="cuda"))
    build_s = time.time() - t0
    idx = [i % n_sets for i in range(per_graph)]
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")

    def ours(i):
        return lambda: pyeffort.matmul(xs[i], bs[i], eff, out=ys[i])

    def dense(i):
        return lambda: F.linear(xs[i].view(1, -1), ws[i])

    g_dense = graph_of([dense(i) for i in idx])
    t_dense = time_graph(g_dense, per_graph)
    del g_dense
    g = graph_of([ours(i) for i in idx])
    sel = graph_of([(lambda i=i: cuda.select(xs[i], bs[i], eff)) for i in idx])
    sel1 = graph_of([(lambda i=i: cuda.select(xs[i], bs[i], eff, stages=1)) for i in idx])
    rows = []
    for e in efforts:
        eff.fill_(e)
        t = time_graph(g, per_graph)
        t_sel = time_graph(sel, per_graph)
        t_sel1 = time_graph(sel1, per_graph)
        _, info = pyeffort.matmul(xs[0], bs[0], e, return_info=True)
        # selection traffic per row: order, stats, keys and x written and read back
        sel_bytes = bs[0].n_rows * 20
        rows.append(
            {
                "shape": f"{n_in}x{n_out}",
                "effort": e,
                "realised": round(info.effort, 4),
                "us": round(t, 2),
                "keys_us": round(t_sel1, 2),
                "select_us": round(t_sel, 2),
                "cublas_us": round(t_dense, 2),
                "speedup": round(t_dense / t, 3),
                "weight_bytes": info.bytes_read,
                "gbps": round((info.bytes_read + sel_bytes) / t / 1e3, 1),
                "cublas_gbps": round(dense_bytes / t_dense / 1e3, 1),
                "n_sets": n_sets,
                "ct": bs[0].ct,
                "tiles": bs[0].n_tiles,
                "splits": bs[0].n_splits,
                "build_s": round(build_s, 2),
            }
        )
    for r in rows:
        if r["effort"] in (1.0, 0.25):
            r["phases"] = profile(bs, xs, r["effort"])
    if pdl_check:  # the same graph captured without programmatic dependent launch
        cuda.set_pdl(False)
        g2 = graph_of([ours(i) for i in idx])
        cuda.set_pdl(True)
        for r in rows:
            if r["effort"] in (1.0, 0.5, 0.25):
                eff.fill_(r["effort"])
                r["us_no_pdl"] = round(time_graph(g2, per_graph), 2)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes")
    ap.add_argument("--quick", action="store_true", help="efforts 1.0, 0.5, 0.25 only")
    args = ap.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    efforts = [1.0, 0.5, 0.25] if args.quick else EFFORTS
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {bw:.0f} GB/s")
    rows = []
    for n_in, n_out in shapes:
        rows += bench_shape(n_in, n_out, efforts, gen, pdl_check=(n_in, n_out) == (4096, 14336))
        torch.cuda.empty_cache()
    hdr = (
        "shape",
        "effort",
        "realised",
        "us",
        "keys_us",
        "select_us",
        "cublas_us",
        "speedup",
        "gbps",
        "cublas_gbps",
        "us_no_pdl",
    )
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in hdr))
    for r in rows:
        if "phases" in r:
            print(r["shape"], r["effort"], " ".join(f"{k}={v}" for k, v in r["phases"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"copy_gbps": bw, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
