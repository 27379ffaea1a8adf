"""Probe: effort moved between tokens, inside each matrix (torch twin, GPU).

Each matrix keeps its effort from the shipped split, but over a whole set of windows at once:
one cutoff on ``abs(x_ti) * stat(k, i)`` over every token of the set, so a token with many large
products gets more rows and one with few gets fewer; the multiplications over the set are the
same as the per-token rule's. This is the bound of what a calibrated absolute threshold per
matrix (TEAL's way) could give; it breaks the per-call contract (each call does its asked
effort). Issue 6.

python experiments/quality/quality_pool.py --gguf M.gguf --ids ids.npy --profile P.json --out-weights W \
    --out OUT.json
"""

from __future__ import annotations

import math

import torch
import torch_search as S
import twin_probe as T
from torch_twin import GROUP

from pyeffort.models.profiles import allocation as A


def pooled(mat, x, effort):
    """The matrix at ``effort`` over all rows of ``x`` together: one cutoff for every token;
    also the multiplications of each token."""
    n, g = x.shape[0], mat.mults_per_row
    rows = min(math.ceil(effort * n * mat.size / g - 1e-9), n * GROUP * mat.n_in)
    score = (x.abs()[:, None, :] * mat.stats[None]).reshape(-1)
    c = torch.sort(score, descending=True).values[rows - 1]
    keep = (score >= c).reshape(n, GROUP, mat.n_in)
    return mat.product_rows(x, keep), int(keep.sum()) * g, keep.sum((1, 2)) * g


class PooledProduct:
    """Every matrix pooled over the tokens; sums each token's effort over the matrices."""

    def __init__(self):
        self.tok, self.n = None, 0

    def __call__(self, name, mat, x, e):
        if e >= 1.0:
            return mat(x, e)
        y, mults, per_tok = pooled(mat, x, e)
        f = per_tok.double() / mat.size
        self.tok = f if self.tok is None else self.tok + f
        self.n += 1
        return y, mults

    def spread(self, t_n: int) -> dict:
        """Quantiles of the tokens' mean effort over the pooled matrices, and position 0's."""
        tok = self.tok / self.n
        q = torch.quantile(tok.float(), torch.tensor([0.1, 0.5, 0.9], device=tok.device))
        return {
            "token_effort_p10_p50_p90": [round(float(v), 3) for v in q],
            "pos0_effort": float(tok.reshape(-1, t_n)[:, 0].mean()),
        }


def main(argv=None):
    p = T.parser(__doc__)
    p.add_argument("--profile", required=True)
    args = p.parse_args(argv)
    model, bench = T.setup(args)
    prof = A.load(args.profile)
    rows = T.Rows(args.out)
    for e in T.efforts(args):
        eff = S.profile_efforts(model, prof, e)
        for pool in (False, True):
            row = {"effort": e, "pooled": pool}
            for k in ("hold", "eval", "cal"):
                product = PooledProduct() if pool else T.plain
                kls, realised = T.kl_pass(model, bench, eff, product, (k,))
                row[k], row[k + "_realised"] = float(kls[k].mean()), realised[k]
                if pool:
                    spread = product.spread(bench.sets[k].shape[1])
                    row.update({f"{k}_{n}": v for n, v in spread.items()})
            rows.add(row)
    rows.write()


if __name__ == "__main__":
    main()
