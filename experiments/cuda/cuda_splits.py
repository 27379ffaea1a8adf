"""Row splits per matrix side by side in one process: for each case (a single matrix or a group
that shares its input), each kernel build and each split count, µs per call in CUDA graphs over
weight sets that L2 cannot hold (as cuda_variants.py). Fewer splits mean fewer blocks, fewer
partial tiles to sum and fewer candidate segments, but more rows per block.

    python experiments/cuda/cuda_splits.py LIB.so [LIB.so ...] [--cases wo,qkv,kv,w2] [--splits 0,48,32,24,16]
        [--efforts 1.0,0.5,0.25,0.1] [--json out.json]

Split count 0 is the default (as many as fill the multiprocessors); counts above a case's
maximum are skipped. Each configuration's bits are checked against a repeat call.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

from pyeffort import cuda

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cuda_bench import ROTATE_BYTES, graph_of, time_graph
from cuda_variants import use_lib

CASES = {  # name: (n_in, [n_out...], ct or None: by width)
    "wo": (4096, [4096], None),
    "kv": (4096, [1024], None),
    "qkv": (4096, [4096, 1024, 1024], 64),
    "w2": (14336, [4096], None),
    "w13": (4096, [14336, 14336], 128),
}


def bench_case(name, libs, splits, efforts, rounds, gen):
    n_in, n_outs, ct = CASES[name]
    n_sets = max(2, math.ceil(ROTATE_BYTES / (2 * n_in * sum(n_outs))))
    per_graph = max(n_sets, 24)
    mats, ws, xs, ys = [], [], [], []
    for _ in range(n_sets):
        w = (torch.randn((n_in, sum(n_outs)), generator=gen, device="cuda") * 0.02).half()
        parts = torch.split(w, n_outs, dim=1)
        mats.append([cuda.build_buckets(p.contiguous(), ct=ct) for p in parts])
        ws.append(w.t().contiguous())
        del w, parts
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys.append([torch.empty(n, dtype=torch.float16, device="cuda") for n in n_outs])
    bs = [b for ms in mats for b in ms]
    n_sms = cuda.num_sms(bs[0].device)
    s_max = (n_sms - len(n_outs)) // sum(b.n_tiles for b in mats[0])
    eff = torch.tensor([1.0], dtype=torch.float64, device="cuda")
    res, cublas = {}, []
    for _ in range(rounds):
        g = graph_of(
            [(lambda i=i: F.linear(xs[i].view(1, -1), ws[i])) for i in idx(per_graph, n_sets)]
        )
        cublas.append(time_graph(g, per_graph))
        del g
        for lib in libs:
            for s in splits:
                if s > s_max:
                    continue
                grps = [cuda.CudaGroup(ms, splits=s or None) for ms in mats]
                use_lib(lib, bs, grps)
                key = f"{pathlib.Path(lib).stem} s={grps[0].splits}"
                r = res.setdefault(key, {"us": {e: [] for e in efforts}})
                g = graph_of(
                    [
                        (lambda i=i, gr=grps: cuda.matmul_group(xs[i], gr[i], eff, outs=ys[i]))
                        for i in idx(per_graph, n_sets)
                    ]
                )
                for e in efforts:
                    eff.fill_(e)
                    r["us"][e].append(round(time_graph(g, per_graph), 2))
                del g
                for e in efforts:  # deterministic: the same bits on a repeat call
                    a = cuda.matmul_group(xs[0], grps[0], e)
                    b = cuda.matmul_group(xs[0], grps[0], e)
                    assert all(
                        torch.equal(u.view(torch.int16), v.view(torch.int16)) for u, v in zip(a, b)
                    )
    return {"case": name, "cublas_us": [round(t, 2) for t in cublas], "configs": res}


def idx(per_graph, n_sets):
    return [i % n_sets for i in range(per_graph)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--cases", default="wo,kv,qkv,w2")
    ap.add_argument("--splits", default="0,48,32,24,16")
    ap.add_argument("--efforts", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    efforts = [float(v) for v in args.efforts.split(",")]
    splits = [int(v) for v in args.splits.split(",")]
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    allres = []
    for c in args.cases.split(","):
        allres.append(bench_case(c, args.libs, splits, efforts, args.rounds, gen))
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(allres, f, indent=1, default=str)
    for r in allres:
        print(f"{r['case']}  cuBLAS {r['cublas_us']} µs")
        for key, v in r["configs"].items():
            cells = "  ".join(f"{e}: {min(ts):.1f}" for e, ts in v["us"].items())
            print(f"  {key:18s} {cells}")


if __name__ == "__main__":
    main()
