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

python experiments/quality/quality_dyn.py --gguf M.gguf --ids ids.npy --profile P.json --out-weights W \
    --out OUT.json
"""

from __future__ import annotations

import math

import torch
import torch_search as S
import twin_probe as T
from torch_twin import GROUP, TwinLlama

from pyeffort.models.profiles import allocation as A
from pyeffort.models.profiles import out_weights


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
    keep = (score >= c[:, None]).reshape(n, GROUP, mat.n_in)
    return mat.product_rows(x, keep), int(keep.sum()) * g


def dynamic_product(a_up: dict, r: dict):
    """The product of every matrix: ``up`` per token from its gate's output, the others plain."""
    gate_out = {}

    def product(name, mat, x, e):
        if name.endswith("ffn.w3") and e < 1.0:
            gate = name.replace("ffn.w3", "ffn.w1")
            s = torch.nn.functional.silu(gate_out[gate]).abs() / r[gate].clamp_min(1e-12)
            return dynamic_up(mat, x, e, s, a_up[name])
        y, mults = mat(x, e)
        if name.endswith("ffn.w1"):
            gate_out[name] = y
        return y, mults

    return product


def main(argv=None):
    p = T.parser(__doc__)
    p.add_argument("--profile", required=True)
    args = p.parse_args(argv)
    if not args.out_weights:
        p.error("--out-weights is needed (the static weights that the gate reweights)")
    model, bench = T.setup(args)
    r = gate_rms(model, bench.sets["cal"])
    ow = out_weights.load(args.out_weights)
    a_up = {
        n: (m.stack * torch.from_numpy(ow[n]).to(model.device)[None, None, :]).pow(2)
        for n, m in model.mats.items()
        if n.endswith("ffn.w3")
    }  # (16, n_in, n_out) each
    prof = A.load(args.profile)
    rows = T.Rows(args.out)
    for e in T.efforts(args):
        eff = S.profile_efforts(model, prof, e)
        for dyn in (False, True):
            product = dynamic_product(a_up, r) if dyn else T.plain
            kls, realised = T.kl_pass(model, bench, eff, product)
            row = {k: float(v.mean()) for k, v in kls.items()}
            rows.add({**row, "realised": realised, "effort": e, "dynamic_up": dyn})
    rows.write()


if __name__ == "__main__":
    main()
