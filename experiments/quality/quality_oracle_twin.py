"""Probe: the per-matrix oracle with the shipped budget split (torch twin, GPU).

Per token and matrix, exactly the ``round(e * n_in * n_out)`` largest products ``abs(x_i w_ij)``
(``--weighted``: ``abs(x_i w_ij) a_j`` with the shipped per-output weights) at the matrix's
effort ``e`` from the split: what element selection could reach inside each matrix with this
split, with no bucket rows (the limit of ever larger groups). The threshold per token comes from
a bisection over counts on the rows of ``abs(W) a`` sorted once; the products are summed in
chunks of tokens. Issue 6.

python experiments/quality/quality_oracle_twin.py --gguf M.gguf --ids ids.npy --profile P.json \
    --out-weights W --out OUT.json
"""

from __future__ import annotations

import torch
import torch_search as S
import twin_probe as T

from pyeffort.models.profiles import allocation as A
from pyeffort.models.profiles import out_weights


class Oracle:
    """``abs(W) * a`` of one matrix with its rows sorted, for counting products above a cut."""

    def __init__(self, w32: torch.Tensor, a: torch.Tensor | None):
        self.w = w32
        self.wa = w32.abs() * (a[None, :] if a is not None else 1.0)
        self.rows = torch.sort(self.wa, dim=1).values.contiguous()  # (n_in, n_out) ascending

    def count(self, ax: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Products with ``ax_i * wa_ij > t`` per token: ax (N, n_in), t (N,) -> (N,)."""
        q = (t[:, None] / ax).T.contiguous()  # (n_in, N); inf where x_i = 0
        below = torch.searchsorted(self.rows, q, right=True)  # elements <= q per row
        return (self.rows.shape[1] - below).sum(0)

    def __call__(self, x: torch.Tensor, effort: float, chunk: int = 128):
        n_in, n_out = self.w.shape
        k = round(effort * n_in * n_out)
        ax = x.abs()
        hi = (ax.max(1).values * self.wa.max()).double().clamp_min(1e-30)
        lo = torch.zeros_like(hi)
        for _ in range(48):  # smallest cut found with at most k products above it
            mid = (lo + hi) / 2
            over = self.count(ax, mid.float()) > k
            lo = torch.where(over, mid, lo)
            hi = torch.where(over, hi, mid)
        t = hi.float()
        mults = int(self.count(ax, t).sum())
        y = torch.empty(x.shape[0], n_out, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s : s + chunk], t[s : s + chunk]
            q = ts[:, None] / ax[s : s + chunk]  # the comparison count() makes
            keep = self.wa[None] > q[:, :, None]
            y[s : s + chunk] = torch.einsum("ni,nio->no", xs, self.w[None] * keep)
        return y, mults


def oracle_product(oracles: dict):
    def product(name, mat, x, e):
        if e >= 1.0:
            return x @ mat.w32, x.shape[0] * mat.size
        return oracles[name](x, e)

    return product


def main(argv=None):
    p = T.parser(__doc__)
    p.add_argument("--profile", required=True)
    args = p.parse_args(argv)
    if not args.out_weights:
        p.error("--out-weights is needed (the weighted oracle)")
    which = ("hold", "eval")
    model, bench = T.setup(args, weighted=False, which=which)
    ow = out_weights.load(args.out_weights)
    prof = A.load(args.profile)
    plain = {n: Oracle(m.w32, None) for n, m in model.mats.items()}
    weighted = {
        n: Oracle(m.w32, torch.from_numpy(model._gguf_order(n, ow[n])).to(model.device))
        for n, m in model.mats.items()
    }
    runs = [("plain, uniform", plain, None, 0.5)]  # the harness's (f) row, as a check
    for label, oracles in (("plain, shipped split", plain), ("weighted, shipped split", weighted)):
        runs += [(label, oracles, prof, e) for e in T.efforts(args)]
    rows = T.Rows(args.out)
    for label, oracles, prof_, e in runs:
        eff = S.profile_efforts(model, prof_, e)
        kls, realised = T.kl_pass(model, bench, eff, oracle_product(oracles), which)
        row = {k: float(v.mean()) for k, v in kls.items()}
        rows.add({**row, "realised": realised, "variant": label, "effort": e})
    rows.write()


if __name__ == "__main__":
    main()
