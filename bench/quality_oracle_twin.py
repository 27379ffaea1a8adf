"""Probe: the per-matrix oracle with the shipped budget split (torch twin, GPU).

Per token and matrix, exactly the ``round(e * n_in * n_out)`` largest products ``abs(x_i w_ij)``
(``--weighted``: ``abs(x_i w_ij) a_j`` with the shipped per-output weights) at the matrix's
effort ``e`` from the split: what element selection could reach inside each matrix with this
split, with no bucket rows (the limit of ever larger groups). The threshold per token comes from
a bisection over counts on the rows of ``abs(W) a`` sorted once; the products are summed in
chunks of tokens. Issue 6.

python bench/quality_oracle_twin.py --gguf M.gguf --ids ids.npy --profile P.json \
    --out-weights W --out OUT.json
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


def run(model, bench, oracles, prof, effort, which):
    eff = S.profile_efforts(model, prof, effort)
    acc = {"mults": 0.0, "size": 0}

    def hook(name, mat, x):
        e = eff.get(name, 1.0)
        if e >= 1.0:
            y, mults = x @ mat.w32, x.shape[0] * mat.size
        else:
            y, mults = oracles[name](x, e)
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
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TwinLlama(args.gguf, dev)
    ow = out_weights.load(args.out_weights)
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, 256)
    sets = {k: v for k, v in sets.items() if k in ("hold", "eval")}
    bench = S.Bench(model, sets)
    prof = A.load(args.profile)
    plain = {n: Oracle(m.w32, None) for n, m in model.mats.items()}
    res, t0 = [], time.time()
    for label, oracles, prof_, e in (("plain, uniform", plain, None, 0.5),):
        row = run(model, bench, oracles, prof_, e, ("hold", "eval"))
        row.update(variant=label, effort=e)
        res.append(row)
        print(f"[{time.time() - t0:5.0f}s] {json.dumps(row)}", flush=True)
    weighted = {
        n: Oracle(m.w32, torch.from_numpy(model._gguf_order(n, ow[n])).to(dev))
        for n, m in model.mats.items()
    }
    for label, oracles in (("plain, shipped split", plain), ("weighted, shipped split", weighted)):
        for e in (0.25, 0.5):
            row = run(model, bench, oracles, prof, e, ("hold", "eval"))
            row.update(variant=label, effort=e)
            res.append(row)
            print(f"[{time.time() - t0:5.0f}s] {json.dumps(row)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
