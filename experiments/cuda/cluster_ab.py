"""The coop kernel (bucketmul.cu) against the cluster kernel (cluster.cu, exact and with the
0.02 tolerance), side by side in one
process on one GPU: µs per call in CUDA graphs (weights rotated past L2, bench/cuda_run.py's
timing) of single matrices and the grouped calls at each effort, cuBLAS fp16 in the same run,
and the fixed cost (effort 0.01 minus its streaming at the run's best bandwidth).

    python experiments/cuda/cluster_ab.py --out cluster_ab.json [--splits 8]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.cuda_run import graph_time_us, n_sets  # noqa: E402

SHAPES = {"4096x14336": (4096, (14336,)), "qkv": (4096, (4096, 1024, 1024)),
          "gateup": (4096, (14336, 14336)), "14336x4096": (14336, (4096,))}  # fmt: skip
EFFORTS = (1.0, 0.5, 0.25, 0.1, 0.01)
MIN_CALLS = 24


def time_shape(torch, cuda, kernel, kind, n_in, outs, splits):
    """-> {effort: (µs per call, weight bytes)} of one shape (a group when several outs);
    kernel "cluster_tol": the cluster kernel with set_tolerance(0.02); "cluster8": with
    clusters of at most 8 blocks (the portable size)."""
    cuda.set_tolerance(0.02 if kernel == "cluster_tol" else 0.0)
    cuda.CLUSTER_MAX = 8 if kernel == "cluster8" else 16  # cluster8: clusters of 8 at most
    kernel = "coop" if kernel == "coop" else "cluster"
    cuda.set_kernel(kernel)
    gen = torch.Generator(device="cuda").manual_seed(1)
    groups, xs = [], []
    for _ in range(n_sets(2 * n_in * sum(outs))):
        ws = [(torch.randn((n_in, o), generator=gen, device="cuda") * 0.02).half() for o in outs]
        mats = [cuda.build_buckets(w, values=kind) for w in ws]
        if len({m.ct for m in mats}) > 1:  # a group needs one tile width: the narrowest
            ct = min(m.ct for m in mats)
            mats = [cuda.build_buckets(w, values=kind, ct=ct) for w in ws]
        groups.append(cuda.CudaGroup(mats, splits=splits if kernel == "cluster" else None))
        xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        del ws
    ys = [torch.empty(o, dtype=torch.float16, device="cuda") for o in outs]
    n = max(len(groups), MIN_CALLS)
    res = {}
    for e in EFFORTS:
        _, infos = cuda.matmul_group(xs[0], groups[0], e, outs=ys, return_info=True)
        t = graph_time_us(
            lambda i, e=e: cuda.matmul_group(xs[i % len(xs)], groups[i % len(groups)], e, outs=ys),
            n,
        )
        res[e] = (t, sum(i.bytes_read for i in infos))
    layout = {"ct": groups[0].mats[0].ct, "splits": groups[0].splits[0]}
    del groups, xs
    torch.cuda.empty_cache()
    return res, layout


def cublas_us(torch, n_in, n_out):
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(2)
    sets = [
        ((torch.randn((n_out, n_in), generator=gen, device="cuda") * 0.02).half(),
         torch.randn(n_in, generator=gen, device="cuda").half())
        for _ in range(n_sets(2 * n_in * n_out))
    ]  # fmt: skip
    n = max(len(sets), MIN_CALLS)
    return graph_time_us(lambda i: F.linear(sets[i % len(sets)][1].view(1, -1), sets[i % len(sets)][0]), n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="cluster_ab.json")
    p.add_argument("--splits", type=int, default=None, help="cluster size (default: by tiles)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--kinds", default="f16,q8")
    args = p.parse_args(argv)
    import torch

    from pyeffort import cuda

    res = {"card": torch.cuda.get_device_name(), "runs": {}}
    for name in args.shapes.split(","):
        n_in, outs = SHAPES[name]
        if len(outs) == 1:
            res["runs"][f"{name}/cublas"] = cublas_us(torch, n_in, outs[0])
            print(f"{name} cublas {res['runs'][f'{name}/cublas']:.1f} us", flush=True)
        for kind in args.kinds.split(","):
            for kernel in ("coop", "cluster", "cluster_tol", "cluster8")[: 4 if kind == "f16" else 3]:
                try:
                    r, layout = time_shape(torch, cuda, kernel, kind, n_in, outs, args.splits)
                except Exception as e:  # noqa: BLE001 (a layout that does not launch: recorded)
                    res["runs"][f"{name}/{kind}/{kernel}"] = {"error": repr(e)[:500]}
                    print(f"{name} {kind} {kernel}: {e!r}"[:400], flush=True)
                    torch.cuda.empty_cache()
                    continue
                res["runs"][f"{name}/{kind}/{kernel}"] = {"layout": layout, "us": {str(e): v for e, v in r.items()}}
                gbps = r[1.0][1] / r[1.0][0] / 1e3
                fixed = r[0.01][0] - r[0.01][1] / gbps / 1e3
                row = " ".join(f"{r[e][0]:6.1f}" for e in EFFORTS)
                print(f"{name:11s} {kind} {kernel:7s} {layout} us at {EFFORTS}: {row}  "
                      f"fixed {fixed:.1f} us ({gbps:.0f} GB/s at 1.0)", flush=True)  # fmt: skip
                pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
