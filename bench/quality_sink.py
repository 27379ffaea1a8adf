"""Where the KL sits along a window, and what exact first positions buy (torch twin, GPU).

For each profile and effort: the mean KL per position over the windows of each set (calibration,
held-out, evaluation), and the variant ``sink P``: positions 0..P-1 of every window run exact,
the others at the effort e' that keeps the total multiplications at e of all
(e' = (e T - P) / (T - P)). A probe for issue 6, not a rule pyeffort ships.

python bench/quality_sink.py --gguf M.gguf --ids ids.npy --profiles a.json,b.json \
    --out-weights W.safetensors --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pyeffort.quality import allocation as A
from pyeffort.quality import out_weights
from pyeffort.quality import torch_search as S
from pyeffort.quality.torch_twin import TwinLlama, kl_per_token


def run(model, bench, prof, effort, sink, which):
    t_n = bench.sets[which[0]].shape[1]
    e_rest = (effort * t_n - sink) / (t_n - sink)
    eff = S.profile_efforts(model, prof, e_rest)
    acc = {"mults": 0.0, "size": 0}

    def hook(name, mat, x):
        e = eff.get(name, 1.0)
        pos = torch.arange(x.shape[0], device=x.device) % t_n
        head = pos < sink
        y = torch.empty(x.shape[0], mat.n_out, device=x.device)
        if head.any():
            y[head] = x[head] @ mat.w32
            acc["mults"] += int(head.sum()) * mat.size
        rest, mults = mat(x[~head], e)
        y[~head] = rest
        acc["mults"] += float(mults)
        acc["size"] += x.shape[0] * mat.size
        return y

    out = {}
    for k in which:
        kl = kl_per_token(bench.exact[k], model.forward(bench.sets[k], hook))  # (B, T)
        per_pos = kl.mean(0)
        out[k] = {
            "kl": float(kl.mean()),
            "pos0": float(per_pos[0]),
            "pos1_7": float(per_pos[1:8].mean()),
            "pos8_": float(per_pos[8:].mean()),
            "share_first8": float(per_pos[:8].sum() / per_pos.sum()),
        }
    out["realised"] = acc["mults"] / acc["size"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--profiles", required=True, help="comma-separated profile JSON files")
    p.add_argument("--out-weights", default=None)
    p.add_argument("--efforts", default="0.25,0.5")
    p.add_argument("--sinks", default="0,1,4")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ow = out_weights.load(args.out_weights) if args.out_weights else None
    model = TwinLlama(args.gguf, dev, ow)
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, 256)
    bench = S.Bench(model, sets)
    res = []
    t0 = time.time()
    for path in args.profiles.split(","):
        prof = A.load(path)
        for e in (float(v) for v in args.efforts.split(",")):
            for sink in (int(v) for v in args.sinks.split(",")):
                r = run(model, bench, prof, e, sink, ("cal", "hold", "eval"))
                r.update(profile=path, effort=e, sink=sink)
                res.append(r)
                print(
                    f"[{time.time() - t0:5.0f}s] {path} e={e} sink={sink} realised "
                    f"{r['realised']:.4f} "
                    + " ".join(
                        f"{k}: {r[k]['kl']:.4f} (pos0 {r[k]['pos0']:.3f}, 1-7 {r[k]['pos1_7']:.3f},"
                        f" 8+ {r[k]['pos8_']:.3f}, first8 {r[k]['share_first8']:.2f})"
                        for k in ("cal", "hold", "eval")
                    ),
                    flush=True,
                )
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
