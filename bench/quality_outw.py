"""Variants of the per-output weights of the output-weighted statistic (torch twin, GPU).

Every matrix is rebuilt with weights ``a_j ** gamma`` (the shipped Fisher weights, ``gamma`` 1 as
shipped) or with Fisher weights recomputed on more calibration windows (``fisher:EVERY:SAMPLES``:
every EVERY-th of the 24 calibration windows, SAMPLES draws per position), and the model is run
with one budget split at each effort; KL on the calibration, held-out and evaluation windows
(choose on held-out only). A probe for issue 6.

python bench/quality_outw.py --gguf M.gguf --ids ids.npy --profile P.json \
    --out-weights W.safetensors --variants 1,0.5,1.5,fisher:1:8 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from quality_stat import fisher_weights

from pyeffort.quality import allocation as A
from pyeffort.quality import out_weights
from pyeffort.quality import torch_search as S
from pyeffort.quality.torch_twin import TwinLlama, TwinMatrix


def rebuild(model: TwinLlama, w16: dict, a: dict) -> None:
    """Every matrix rebuilt with weights ``a[name]`` (twin order)."""
    for n, w in w16.items():
        model.mats[n] = None
        model.mats[n] = TwinMatrix(n, w, model.device, a[n])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--out-weights", required=True, help="the shipped weights (gamma variants)")
    p.add_argument("--variants", default="1,0.5,0.75,1.25,1.5")
    p.add_argument("--efforts", default="0.25,0.5")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TwinLlama(args.gguf, dev)
    w16 = {n: m.w32.half().cpu().numpy() for n, m in model.mats.items()}
    shipped = {n: model._gguf_order(n, v) for n, v in out_weights.load(args.out_weights).items()}
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, 256)
    bench = S.Bench(model, sets)
    prof = A.load(args.profile)
    res, t0 = [], time.time()
    for v in args.variants.split(","):
        if v.startswith("fisher:"):
            _, every, samples = v.split(":")
            rebuild(model, w16, {n: None for n in w16})
            cal = torch.from_numpy(np.asarray(sets["cal"][:: int(every)]))
            a = {
                n: t.double().cpu().numpy()
                for n, t in fisher_weights(model, cal, int(samples)).items()
            }
        else:
            a = {n: s.astype(np.float64) ** float(v) for n, s in shipped.items()}
        a = {n: (x / x.mean()).astype(np.float32) for n, x in a.items()}
        rebuild(model, w16, a)
        for e in (float(x) for x in args.efforts.split(",")):
            r = bench.kl(S.profile_efforts(model, prof, e), ("cal", "hold", "eval"))
            r.update(variant=v, effort=e)
            res.append(r)
            print(f"[{time.time() - t0:5.0f}s] {json.dumps(r)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
