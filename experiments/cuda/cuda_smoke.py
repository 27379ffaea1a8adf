"""A first look on a fresh GPU machine: does the effort kernel launch and match the reference
with each launch mode (cooperative, PDL), eagerly and in a CUDA graph? Prints one line per mode
and, last, ``BEST_ENV=...``: the environment for the fastest correct mode (for cuda_run.sh).

    python experiments/cuda/cuda_smoke.py
"""

from __future__ import annotations

import numpy as np
import torch

import pyeffort
from pyeffort import cuda, reference


def check(bc, b, x, y_ref, effort) -> str:
    y = pyeffort.matmul(x, bc, effort)
    torch.cuda.synchronize()
    err = float(np.abs(y.cpu().numpy() - y_ref).max() / (np.abs(y_ref).max() + 1e-30))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    out = torch.empty_like(y)
    with torch.cuda.stream(s):
        pyeffort.matmul(x, bc, effort, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pyeffort.matmul(x, bc, effort, out=out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    same = bool(torch.equal(out, y))
    return f"rel_err={err:.2e} graph_equal={same}" if err < 1e-4 and same else f"BAD {err} {same}"


def main():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    bc = b.to("cuda")
    x = torch.randn(4096, device="cuda").half()
    y_ref = np.empty((1, 4096), dtype=np.float32)
    x32 = x.float().cpu().numpy()[None]
    reference.bucketmul(x32, b.values, b.positions, b.stats, b.order, b.n_out, 0.3, y_ref)
    best = None
    for coop in (True, False):
        for pdl in (True, False):
            cuda.set_coop(coop)
            cuda.set_pdl(pdl)
            try:
                res = check(bc, b, x, y_ref[0], 0.3)
            except Exception as exc:  # noqa: BLE001 - report and try the next mode
                res = f"FAILED {type(exc).__name__}: {exc}"
            print(f"coop={int(coop)} pdl={int(pdl)}: {res}", flush=True)
            if best is None and not res.startswith(("BAD", "FAILED")):
                best = (coop, pdl)
    if best is not None:
        print(f"BEST_ENV=PYEFFORT_CUDA_COOP={int(best[0])} PYEFFORT_CUDA_PDL={int(best[1])}")


if __name__ == "__main__":
    main()
