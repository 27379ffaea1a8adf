"""Probe: effort moved between tokens, inside each matrix (torch twin, GPU).

Each matrix keeps its effort from the shipped split, but over a whole set of windows at once:
one cutoff on ``abs(x_ti) * stat(k, i)`` over every token of the set, so a token with many large
products gets more rows and one with few gets fewer; the multiplications over the set are the
same as the per-token rule's. This is the bound of what a calibrated absolute threshold per
matrix (TEAL's way) could give; it breaks the per-call contract (each call does its asked
effort). Issue 6.

python bench/quality_pool.py --gguf M.gguf --ids ids.npy --profile P.json --out-weights W \
    --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from pyeffort.quality import allocation as A
from pyeffort.quality import out_weights
from pyeffort.quality import torch_search as S
from pyeffort.quality.torch_twin import GROUP, TwinLlama, kl_per_token


def pooled(mat, x, effort):
    """The matrix at ``effort`` over all rows of ``x`` together: one cutoff for every token."""
    n, g = x.shape[0], mat.mults_per_row
    rows = min(math.ceil(effort * n * mat.size / g - 1e-9), n * GROUP * mat.n_in)
    score = (x.abs()[:, None, :] * mat.stats[None]).reshape(-1)
    c = torch.sort(score, descending=True).values[rows - 1]
    mask = (score >= c).reshape(n, GROUP, mat.n_in)
    xs = torch.where(mask.transpose(0, 1), x[None], 0.0)  # (16, N, n_in)
    return torch.bmm(xs, mat.stack).sum(0), int(mask.sum()) * g, mask.sum((1, 2)) * g


def run(model, bench, prof, effort, pool, which):
    eff = S.profile_efforts(model, prof, effort)
    out = {}
    for k in which:
        acc = {"mults": 0.0, "size": 0, "tok": None}
        t_n = bench.sets[k].shape[1]

        def hook(name, mat, x, acc=acc):
            e = eff.get(name, 1.0)
            if pool and e < 1.0:
                y, mults, per_tok = pooled(mat, x, e)
            else:
                y, mults = mat(x, e)
                per_tok = None
            acc["mults"] += float(mults)
            acc["size"] += x.shape[0] * mat.size
            if per_tok is not None:
                f = per_tok.double() / mat.size
                acc["tok"] = f if acc["tok"] is None else acc["tok"] + f
            return y

        kl = kl_per_token(bench.exact[k], model.forward(bench.sets[k], hook))
        out[k] = float(kl.mean())
        out[k + "_realised"] = acc["mults"] / acc["size"]
        if acc["tok"] is not None:  # spread of the per-token effort (mean over matrices)
            tok = acc["tok"] / sum(1 for n in eff if eff[n] < 1.0)
            q = torch.quantile(tok.float(), torch.tensor([0.1, 0.5, 0.9], device=tok.device))
            out[k + "_token_effort_p10_p50_p90"] = [round(float(v), 3) for v in q]
            out[k + "_pos0_effort"] = float(tok.reshape(-1, t_n)[:, 0].mean())
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--out-weights", required=True)
    p.add_argument("--efforts", default="0.25,0.5")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TwinLlama(args.gguf, dev, out_weights.load(args.out_weights))
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, 256)
    bench = S.Bench(model, sets)
    prof = A.load(args.profile)
    res, t0 = [], time.time()
    for e in (float(v) for v in args.efforts.split(",")):
        for pool in (False, True):
            row = run(model, bench, prof, e, pool, ("hold", "eval", "cal"))
            row.update(effort=e, pooled=pool)
            res.append(row)
            print(f"[{time.time() - t0:5.0f}s] {json.dumps(row)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
