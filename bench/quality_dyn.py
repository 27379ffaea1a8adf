"""Probe: per-token output weights for the up projection, taken from the gate (torch twin, GPU).

An error in output j of ``up`` reaches the model through ``silu(g_j)``, and the gate is known
before ``up`` runs. The shipped statistic weights each output by a static ``a_j`` (its Fisher
weight over calibration text); here, for ``up`` only, each token reweights it by
``abs(silu(g_tj)) / r_j`` (``r_j`` the RMS of ``silu(g_j)`` over the calibration windows, ``g``
the gate output at its own effort). Ranks inside groups stay the static build's; each bucket
row's statistic becomes per token, ``sqrt(sum over its weights of (a_j s_tj w_ij)^2 / G)``, and
the token keeps the rows with the largest ``abs(x_i) * stat_t`` (the same number of
multiplications as the static rule at that matrix's effort). A runtime version would need the
per-token statistics cheaply (e.g. over a few output clusters); this measures what the idea
could give at most with the layout unchanged. Issue 6.

python bench/quality_dyn.py --gguf M.gguf --ids ids.npy --profile P.json --out-weights W \
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


def gate_rms(model: TwinLlama, tokens: torch.Tensor) -> dict:
    """Per layer, the RMS over the tokens of silu(gate output), exact model."""
    out = {}

    def hook(name, mat, x):
        y = x @ mat.w32
        if name.endswith("ffn.w1"):
            out[name] = torch.nn.functional.silu(y).pow(2).mean(0).sqrt()
        return y

    model.forward(tokens, hook)
    return out


def dynamic_up(mat, x, effort, s, sq):
    """The up matrix at ``effort`` with per-token row statistics ``sqrt(sq_k @ s^2 / G)``."""
    n, g = x.shape[0], mat.mults_per_row
    rows = min(math.ceil(effort * mat.size / g - 1e-9), GROUP * mat.n_in)
    stat = torch.einsum("kio,no->nki", sq, s * s).div(g).sqrt()  # (N, 16, n_in)
    score = (x.abs()[:, None, :] * stat).reshape(n, -1)
    c = torch.topk(score, rows, dim=1, sorted=False).values.min(1).values
    mask = (score >= c[:, None]).reshape(n, GROUP, mat.n_in)
    xs = torch.where(mask.transpose(0, 1), x[None], 0.0)  # (16, N, n_in)
    return torch.bmm(xs, mat.stack).sum(0), int(mask.sum()) * g


def run(model, bench, prof, effort, dyn, a_up, r, which):
    eff = S.profile_efforts(model, prof, effort)
    acc = {"mults": 0.0, "size": 0}
    state = {}

    def hook(name, mat, x):
        e = eff.get(name, 1.0)
        if dyn and name.endswith("ffn.w3") and e < 1.0:
            gate = name.replace("ffn.w3", "ffn.w1")
            s = torch.nn.functional.silu(state[gate]).abs() / r[gate].clamp_min(1e-12)
            y, mults = dynamic_up(mat, x, e, s, a_up[name])
        else:
            y, mults = mat(x, e)
        if name.endswith("ffn.w1"):
            state[name] = y
        acc["mults"] += float(mults)
        acc["size"] += x.shape[0] * mat.size
        return y

    out = {k: float(kl_per_token(bench.exact[k], model.forward(bench.sets[k], hook)).mean())
           for k in which}  # fmt: skip
    out["realised"] = acc["mults"] / acc["size"]
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
    ow = out_weights.load(args.out_weights)
    model = TwinLlama(args.gguf, dev, ow)
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, 256)
    bench = S.Bench(model, sets)
    r = gate_rms(model, bench.sets["cal"])
    a_up = {}
    for n, m in model.mats.items():
        if n.endswith("ffn.w3"):
            a = torch.from_numpy(ow[n]).to(dev)
            a_up[n] = (m.stack * a[None, None, :]).pow(2)  # (16, n_in, n_out)
    prof = A.load(args.profile)
    res, t0 = [], time.time()
    for e in (float(v) for v in args.efforts.split(",")):
        for dyn in (False, True):
            row = run(model, bench, prof, e, dyn, a_up, r, ("cal", "hold", "eval"))
            row.update(effort=e, dynamic_up=dyn)
            res.append(row)
            print(f"[{time.time() - t0:5.0f}s] {json.dumps(row)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
