"""Variants of the per-output weights of the output-weighted statistic (torch twin, GPU).

Every matrix is rebuilt with weights ``a_j ** gamma`` (the shipped Fisher weights, ``gamma`` 1 as
shipped) or with Fisher weights recomputed on more calibration windows (``fisher:EVERY:SAMPLES``:
every EVERY-th of the 24 calibration windows, SAMPLES draws per position), and the model is run
with one budget split at each effort; KL on the calibration, held-out and evaluation windows
(choose on held-out only). A probe for issue 6.

python experiments/quality/quality_outw.py --gguf M.gguf --ids ids.npy --profile P.json \
    --out-weights W.safetensors --variants 1,0.5,1.5,fisher:1:8 --out OUT.json
"""

from __future__ import annotations

import numpy as np
import torch
import torch_search as S
import twin_probe as T
from quality_stat import fisher_weights
from torch_twin import TwinLlama, TwinMatrix

from pyeffort.models.profiles import allocation as A
from pyeffort.models.profiles import out_weights


def rebuild(model: TwinLlama, w16: dict, a: dict) -> None:
    """Every matrix rebuilt with weights ``a[name]`` (twin order)."""
    for n, w in w16.items():
        model.mats[n] = None
        model.mats[n] = TwinMatrix(n, w, model.device, a[n])


def variant_weights(model, w16, v: str, shipped: dict, cal: np.ndarray) -> dict:
    """The weights of one variant, mean 1 per matrix: ``fisher:EVERY:SAMPLES`` recomputed on
    the calibration windows, else the shipped ones to the power ``v``."""
    if v.startswith("fisher:"):
        _, every, samples = v.split(":")
        rebuild(model, w16, {n: None for n in w16})
        tokens = torch.from_numpy(np.asarray(cal[:: int(every)]))
        a = {
            n: t.double().cpu().numpy()
            for n, t in fisher_weights(model, tokens, int(samples)).items()
        }
    else:
        a = {n: s.astype(np.float64) ** float(v) for n, s in shipped.items()}
    return {n: (x / x.mean()).astype(np.float32) for n, x in a.items()}


def main(argv=None):
    p = T.parser(__doc__)
    p.add_argument("--profile", required=True)
    p.add_argument("--variants", default="1,0.5,0.75,1.25,1.5")
    args = p.parse_args(argv)
    if not args.out_weights:
        p.error("--out-weights is needed (the shipped weights of the gamma variants)")
    model, bench = T.setup(args, weighted=False)
    w16 = {n: m.w32.half().cpu().numpy() for n, m in model.mats.items()}
    shipped = {n: model._gguf_order(n, v) for n, v in out_weights.load(args.out_weights).items()}
    cal = bench.sets["cal"].cpu().numpy()
    prof = A.load(args.profile)
    rows = T.Rows(args.out)
    for v in args.variants.split(","):
        rebuild(model, w16, variant_weights(model, w16, v, shipped, cal))
        for e in T.efforts(args):
            r = bench.kl(S.profile_efforts(model, prof, e), ("cal", "hold", "eval"))
            rows.add({**r, "variant": v, "effort": e})
    rows.write()


if __name__ == "__main__":
    main()
