"""Effort matmul on the GPU against cuBLAS (torch.nn.functional.linear), both in CUDA graphs,
with enough weight sets rotated that L2 holds none of them. Prints a table; --json writes it.
Also grouped calls (q/k/v, w1/w3: one kernel, one input) against one cuBLAS GEMV over the
concatenated weights.

    python experiments/cuda/cuda_bench.py [--json out.json] [--shapes 4096x14336,...] [--quick] [--no-groups]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import profiling  # before any matrix goes to the GPU: PE_PROFILE_LIB loads the stamped build
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


PHASES = [  # (name, from stamp, to stamp): block 0's globaltimer stamps (profiling.py)
    ("prologue", 0, 1),  # block start -> after the PDL wait
    ("keys_hist", 1, 2),  # keys, level-1 histogram share, signal
    ("hist_wait", 2, 3),  # until every worker's histogram is in
    ("pick_b1", 3, 4),
    ("lists", 4, 5),  # sure rows and candidates compacted, candidates published
    ("sure_rows", 5, 6),  # the bulk of the bytes
    ("cut_wait", 6, 7),  # the own candidates' loads are in flight meanwhile
    ("own_cands", 7, 8),
    ("split_sum", 8, 9),  # partial tile, ticket, (last split) the sum
    ("sel_cand_wait", 12, 13),  # selector: until every worker's candidates are in
    ("sel_resolve", 13, 14),  # selector: levels 2 and 3, cut published
]
LATEST = [  # (name, slot): when the last worker reached a stamp, from the first block's start
    ("start", 16),
    ("hist_signaled", 18),
    ("hist_seen", 19),
    ("lists_done", 21),
    ("sure_rows_done", 22),
    ("own_cands_done", 24),
    ("split_sum_done", 25),
    ("all_done", 10),
]


def profile_calls(objs, call):
    """Phase times (µs) of the last of up to four calls (weight sets 1, 2, 3, 0) inside a
    graph, from the kernel's globaltimer stamps; objs[i] (a CudaBuckets or CudaGroup) holds
    set i's stamps, call(i) makes its call; "gap" is from the previous call's last block end
    to the profiled call's first block start. {} unless the profiling build is in use."""
    if not profiling.active():
        return {}
    order = list(range(1, min(4, len(objs)))) + [0]
    prev_b, last_b = objs[order[-2]], objs[0]
    for b in (prev_b, last_b):
        profiling.enable(b)
    g = graph_of([(lambda i=i: call(i)) for i in order])
    for _ in range(3):
        g.replay()
    for b in (prev_b, last_b):  # only the last replay's stamps
        b.timing.zero_()
        b.timing[11] = 2**62
    g.replay()
    torch.cuda.synchronize()
    st, prev = last_b.timing.cpu().tolist(), prev_b.timing.cpu().tolist()
    for b in (prev_b, last_b):
        profiling.enable(b, False)
    res = {k: round((st[b] - st[a]) / 1e3, 2) for k, a, b in PHASES}
    res["cut_ready_at"] = round((st[14] - st[0]) / 1e3, 2)
    res.update({"last_" + k: round((st[i] - st[11]) / 1e3, 2) for k, i in LATEST})
    res["gap_prev_end_to_start"] = round((st[11] - prev[10]) / 1e3, 2)
    res["prev_call_total"] = round((prev[10] - prev[11]) / 1e3, 2)
    return res


def profile(bs, xs, e):
    """profile_calls for single matrices bs[i] on xs[i] at effort e."""
    return profile_calls(bs, lambda i: pyeffort.matmul(xs[i], bs[i], e))


def bench_shape(n_in, n_out, efforts, gen, variants=False, ct=None):
    dense_bytes = 2 * n_in * n_out
    n_sets = max(2, math.ceil(ROTATE_BYTES / dense_bytes))
    per_graph = max(n_sets, 24)
    t0 = time.time()
    ws, bs, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, n_out), generator=gen, device="cuda") * 0.02).half()
        bs.append(cuda.build_buckets(w, ct=ct))
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
    rows = []
    for e in efforts:
        eff.fill_(e)
        t = time_graph(g, per_graph)
        _, info = pyeffort.matmul(xs[0], bs[0], e, return_info=True)
        # selection traffic per row: order and stats read, by every tile's block
        sel_bytes = bs[0].n_rows * 8 * bs[0].n_tiles
        rows.append(
            {
                "shape": f"{n_in}x{n_out}",
                "effort": e,
                "realised": round(info.effort, 4),
                "us": round(t, 2),
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
    if variants:  # the same graph captured without PDL, and without the cooperative launch
        for key, setter in (("us_no_pdl", cuda.set_pdl), ("us_no_coop", cuda.set_coop)):
            setter(False)
            g2 = graph_of([ours(i) for i in idx])
            setter(True)
            for r in rows:
                if r["effort"] in (1.0, 0.5, 0.25):
                    eff.fill_(r["effort"])
                    r[key] = round(time_graph(g2, per_graph), 2)
            del g2
    return rows


GROUPS = {  # name: (n_in, [n_out...], ct)
    "qkv 4096x(4096+1024+1024)": (4096, [4096, 1024, 1024], 64),
    "w1w3 4096x(14336+14336)": (4096, [14336, 14336], 128),
}


def bench_group(name, efforts, gen, ct_override=None):
    """One grouped effort call against one cuBLAS GEMV over the concatenated weights."""
    n_in, n_outs, ct = GROUPS[name]
    ct = ct_override or ct
    dense_bytes = 2 * n_in * sum(n_outs)
    n_sets = max(2, math.ceil(ROTATE_BYTES / dense_bytes))
    per_graph = max(n_sets, 24)
    ws, grps, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, sum(n_outs)), generator=gen, device="cuda") * 0.02).half()
        parts = torch.split(w, n_outs, dim=1)
        grps.append(cuda.CudaGroup([cuda.build_buckets(p.contiguous(), ct=ct) for p in parts]))
        ws.append(w.t().contiguous())
        del w, parts
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys.append([torch.empty(n, dtype=torch.float16, device="cuda") for n in n_outs])
    idx = [i % n_sets for i in range(per_graph)]
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")
    g_dense = graph_of([(lambda i=i: F.linear(xs[i].view(1, -1), ws[i])) for i in idx])
    t_dense = time_graph(g_dense, per_graph)
    del g_dense
    g = graph_of([(lambda i=i: cuda.matmul_group(xs[i], grps[i], eff, outs=ys[i])) for i in idx])
    rows = []
    for e in efforts:
        eff.fill_(e)
        t = time_graph(g, per_graph)
        _, infos = cuda.matmul_group(xs[0], grps[0], e, return_info=True)
        nbytes = sum(i.bytes_read for i in infos)
        rows.append(
            {
                "shape": name,
                "effort": e,
                "realised": round(sum(i.mults for i in infos) / (n_in * sum(n_outs)), 4),
                "us": round(t, 2),
                "cublas_us": round(t_dense, 2),
                "speedup": round(t_dense / t, 3),
                "weight_bytes": nbytes,
                "gbps": round(nbytes / t / 1e3, 1),
                "cublas_gbps": round(dense_bytes / t_dense / 1e3, 1),
                "n_sets": n_sets,
                "ct": ct,
                "splits": grps[0].splits,
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes")
    ap.add_argument("--quick", action="store_true", help="efforts 1.0, 0.5, 0.25 only")
    ap.add_argument("--no-groups", action="store_true")
    ap.add_argument("--ct", type=int, help="tile width for the shapes and w1w3 (default: auto)")
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
        big = (n_in, n_out) == (4096, 14336) and not args.ct
        rows += bench_shape(n_in, n_out, efforts, gen, variants=big, ct=args.ct)
        torch.cuda.empty_cache()
    if not args.no_groups:
        for name in GROUPS:
            if args.ct and name.startswith("qkv"):
                continue  # k and v are 64 groups wide: wider tiles would be padding
            rows += bench_group(name, [1.0, 0.5, 0.25, 0.1], gen, args.ct)
            torch.cuda.empty_cache()
    hdr = (
        "shape",
        "effort",
        "realised",
        "us",
        "cublas_us",
        "speedup",
        "gbps",
        "cublas_gbps",
        "us_no_pdl",
        "us_no_coop",
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
