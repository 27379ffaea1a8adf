"""Builds of the CUDA kernels side by side in one process: the same weight sets, the same
cuBLAS baseline, the libraries interleaved over rounds (so drift shows as spread). Each library
must give the same output bits as the first (the summation order is part of the design).

    python experiments/cuda/cuda_variants.py LIB.so [LIB.so@nocoop ...] [--shapes 4096x14336,4096x4096]
        [--efforts 1.0,0.5,0.25,0.1] [--rounds 2] [--json out.json]

A library named as LIB.so@nocoop runs without the cooperative launch attribute (measurement
only: co-residency is then not guaranteed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

import pyeffort
from pyeffort import cuda

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cuda_bench import (
    GROUPS,
    ROTATE_BYTES,
    graph_of,
    profile,
    profile_calls,
    time_graph,
)


def profile_group(grps, xs, e):
    """cuda_bench.profile_calls for grouped calls (stamps of the group's block 0 and of its
    first matrix's selector)."""
    return profile_calls(grps, lambda i: cuda.matmul_group(xs[i], grps[i], e))


def use_lib(spec: str, bs, groups=()) -> None:
    """Load another build (PATH or PATH@nocoop); its meeting counters and tagged scratch start
    from zero (the tags follow the call count, which restarts)."""
    path, _, mode = spec.partition("@")
    cuda.set_coop(mode != "nocoop")
    os.environ["PYEFFORT_CUDA_LIB"] = path
    cuda._lib_handle = None
    cuda._lib()
    torch.cuda.synchronize()
    for b in bs:
        b._state.zero_()
        b._hist.zero_()
        for t in b._alone._scratch:
            t.zero_()
    for grp in groups:
        for t in grp._scratch:
            t.zero_()


def bench_shape(n_in, n_out, libs, efforts, rounds, gen, prof_efforts=(0.25,)):
    n_sets = max(2, math.ceil(ROTATE_BYTES / (2 * n_in * n_out)))
    per_graph = max(n_sets, 24)
    bs, ws, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, n_out), generator=gen, device="cuda") * 0.02).half()
        bs.append(cuda.build_buckets(w))
        ws.append(w.t().contiguous())
        del w
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys.append(torch.empty(n_out, dtype=torch.float16, device="cuda"))
    idx = [i % n_sets for i in range(per_graph)]
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")
    res = {lib: {"us": {e: [] for e in efforts}} for lib in libs}
    cublas = []
    ref_bits = {}
    for r in range(rounds):
        g = graph_of([(lambda i=i: F.linear(xs[i].view(1, -1), ws[i])) for i in idx])
        cublas.append(time_graph(g, per_graph))
        del g
        for lib in libs:
            use_lib(lib, bs)
            g = graph_of([(lambda i=i: pyeffort.matmul(xs[i], bs[i], eff, out=ys[i])) for i in idx])
            for e in efforts:
                eff.fill_(e)
                res[lib]["us"][e].append(round(time_graph(g, per_graph), 2))
            del g
            for e in efforts:  # same bits as the first library, same realised work
                y, info = pyeffort.matmul(xs[0], bs[0], e, return_info=True)
                y2 = pyeffort.matmul(xs[0], bs[0], e)
                bits = (y.cpu().view(torch.int32).tolist(), info.mults)
                assert torch.equal(y.view(torch.int32), y2.view(torch.int32)), (lib, e, "repeat")
                if e not in ref_bits:
                    ref_bits[e] = bits
                res[lib].setdefault("same_bits", True)
                if bits != ref_bits[e]:
                    res[lib]["same_bits"] = False
                    if e not in res[lib].setdefault("diff_at", []):
                        res[lib]["diff_at"].append(e)
                res[lib].setdefault("realised", {})[e] = round(info.effort, 4)
            if r == 0:
                for pe in prof_efforts:
                    res[lib][f"phases_{pe}"] = profile(bs, xs, pe)
    out = {"shape": f"{n_in}x{n_out}", "cublas_us": [round(t, 2) for t in cublas], "libs": res}
    return out


VGROUPS = {**GROUPS, "w1w3 ct256 4096x(14336+14336)": (4096, [14336, 14336], 256)}


def bench_group(name, libs, efforts, rounds, gen, prof_efforts=(0.25,)):
    """A grouped call (VGROUPS) of each library against one fused cuBLAS GEMV."""
    n_in, n_outs, ct = VGROUPS[name]
    n_sets = max(2, math.ceil(ROTATE_BYTES / (2 * n_in * sum(n_outs))))
    per_graph = max(n_sets, 24)
    grps, ws, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, sum(n_outs)), generator=gen, device="cuda") * 0.02).half()
        parts = torch.split(w, n_outs, dim=1)
        grps.append(cuda.CudaGroup([cuda.build_buckets(p.contiguous(), ct=ct) for p in parts]))
        ws.append(w.t().contiguous())
        del w, parts
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys.append([torch.empty(n, dtype=torch.float16, device="cuda") for n in n_outs])
    bs = [b for grp in grps for b in grp.mats]
    idx = [i % n_sets for i in range(per_graph)]
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")
    res = {lib: {"us": {e: [] for e in efforts}} for lib in libs}
    cublas, ref_bits = [], {}
    for r in range(rounds):
        g = graph_of([(lambda i=i: F.linear(xs[i].view(1, -1), ws[i])) for i in idx])
        cublas.append(time_graph(g, per_graph))
        del g
        for lib in libs:
            use_lib(lib, bs, grps)
            g = graph_of(
                [(lambda i=i: cuda.matmul_group(xs[i], grps[i], eff, outs=ys[i])) for i in idx]
            )
            for e in efforts:
                eff.fill_(e)
                res[lib]["us"][e].append(round(time_graph(g, per_graph), 2))
            del g
            for e in efforts:
                out = cuda.matmul_group(xs[0], grps[0], e)
                bits = [y.cpu().view(torch.int32).tolist() for y in out]
                ref_bits.setdefault(e, bits)
                res[lib].setdefault("same_bits", True)
                if bits != ref_bits[e]:
                    res[lib]["same_bits"] = False
                    if e not in res[lib].setdefault("diff_at", []):
                        res[lib]["diff_at"].append(e)
            if r == 0:
                for pe in prof_efforts:
                    res[lib][f"phases_{pe}"] = profile_group(grps, xs, pe)
    return {"shape": name, "cublas_us": [round(t, 2) for t in cublas], "libs": res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--shapes", default="4096x14336,4096x4096")
    ap.add_argument("--efforts", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", action="store_true", help="also q,k,v and w1,w3 grouped calls")
    ap.add_argument("--profile", default="0.25", help="efforts whose phases are stamped")
    ap.add_argument("--json")
    args = ap.parse_args()
    efforts = [float(v) for v in args.efforts.split(",")]
    prof = [float(v) for v in args.profile.split(",")]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    allres = []
    for s in args.shapes.split(","):
        n_in, n_out = (int(v) for v in s.split("x"))
        allres.append(bench_shape(n_in, n_out, args.libs, efforts, args.rounds, gen, prof))
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(allres, f, indent=1, default=str)
    for name in VGROUPS if args.groups else ():
        allres.append(bench_group(name, args.libs, efforts, args.rounds, gen, prof))
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(allres, f, indent=1, default=str)
    for r in allres:
        cb = min(r["cublas_us"])
        print(f"{r['shape']}  cuBLAS {r['cublas_us']} µs")
        for lib, v in r["libs"].items():
            name = pathlib.Path(lib).name.replace(".so", "")
            cells = "  ".join(
                f"{e}: {min(ts):.1f} ({cb / min(ts):.2f}x) {ts}" for e, ts in v["us"].items()
            )
            bits = "same" if v["same_bits"] else "DIFF@" + "/".join(map(str, v["diff_at"]))
            print(f"  {name:10s} bits={bits}  {cells}")
        for lib, v in r["libs"].items():
            for pe in prof:
                ph = v.get(f"phases_{pe}")
                if ph is None:
                    continue
                cells = " ".join(f"{k}={x}" for k, x in ph.items() if not k.startswith("last_"))
                print(f"  {pathlib.Path(lib).name.replace('.so', ''):10s} phases@{pe} {cells}")


if __name__ == "__main__":
    main()
