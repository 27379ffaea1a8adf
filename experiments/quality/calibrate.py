"""Calibrating a budget split (an allocation profile) on text other than the evaluation text.

1. ``Harness.capture``: run the exact model on calibration windows, keep every linear's inputs.
2. ``error_curves``: per matrix, the squared error of the default rule's output at a grid of
   efforts, relative to the exact output's energy: ``E_m(e) = sum ||dy||^2 / sum ||y||^2``.
3. ``sensitivities``: per matrix, the KL of the model with only that matrix approximated (at
   0.25 and 0.5); ``s_m = KL_m(e) / E_m(e)``, geometric mean over the two efforts.
4. ``solve``: for each user effort, the per-matrix efforts minimising ``sum_m s_m E_m(e_m)``
   under the multiplication budget (a Lagrange multiplier on the convex hull of each curve).
   The profile stores ``e_m / e``; ``Allocation`` rescales so that the total is exactly the
   user's effort.

    python experiments/quality/calibrate.py --text botchan.txt [--model M.gguf] --out P.json
    pyeffort eval --text botchan.txt --model M.gguf --profile P.json ...
"""

from __future__ import annotations

import numpy as np

from pyeffort.eval import rules as R

GRID = np.round(np.concatenate([np.arange(0.02, 0.2, 0.02), np.arange(0.2, 1.0001, 0.05)]), 4)


def error_curves(states, xs, grid=GRID, rule=R.bucket_twin, progress=True) -> dict:
    """name -> (len(grid),) relative squared output error of ``rule`` at each effort."""
    out = {}
    items = list(xs.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="error curves", leave=False)
    for name, x in items:
        st = states[name]
        ex = x @ st.w32
        energy = float((ex.astype(np.float64) ** 2).sum()) or 1.0
        errs = []
        R.pin_rank_stack(st)
        try:
            for e in grid:
                y, _, _ = rule(x, st, float(e))
                errs.append(float(((y - ex).astype(np.float64) ** 2).sum()) / energy)
        finally:
            R.unpin_rank_stack(st)
        out[name] = np.asarray(errs)
    return out


def _choose(curve: np.ndarray, grid: np.ndarray, sens: float, mu: float, size: float) -> float:
    """argmin over the grid (plus effort 0 with error 1) of sens * E(e) + mu * size * e."""
    g = np.concatenate([[0.0], grid])
    c = np.concatenate([[1.0], curve])
    return float(g[np.argmin(sens * c + mu * size * g)])


def solve(curves: dict, sizes: dict, efforts, sens: dict | None = None, grid=GRID) -> dict:
    """The allocation profile {efforts, weights: name -> [e_m / e for each e]}. ``sens``:
    name -> s, or a table {effort: {name: s}} interpolated per effort."""
    names = list(curves)
    sens = sens or {}
    table = sens if sens and all(isinstance(v, dict) for v in sens.values()) else None
    s = np.array([float(sizes[n]) for n in names])
    weights = {n: [] for n in names}
    for e in efforts:
        se = sens_at(table, e) if table else sens
        sv = np.array([float(se.get(n, 1.0)) for n in names])
        target = e * s.sum()
        lo, hi = 1e-16, 1e2

        def total(mu, sv=sv):
            return sum(
                _choose(curves[n], grid, sv[k], mu, s[k]) * s[k] for k, n in enumerate(names)
            )

        for _ in range(60):  # geometric bisection on the multiplier
            mid = np.sqrt(lo * hi)
            lo, hi = (lo, mid) if total(mid) < target else (mid, hi)
        for k, n in enumerate(names):
            em = _choose(curves[n], grid, sv[k], lo, s[k])
            weights[n].append(max(em, 1e-3) / e)
    return {"efforts": [float(e) for e in efforts], "weights": weights}


VERSION = 2


def sensitivities(
    harness, windows, effort: float = 0.25, rule=R.bucket_twin, progress: bool = True
) -> dict[str, float]:
    """name -> KL(exact || model with only that matrix at ``effort``) on ``windows``: what one
    matrix's selection error costs at the model's output (all other matrices exact)."""
    from pyeffort.eval.harness import log_softmax

    states = harness.states
    current = {"name": None}

    def hook(lin, x, user_effort):
        st = states[lin.name]
        x2 = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, st.n_in))
        y = rule(x2, st, effort)[0] if lin.name == current["name"] else x2 @ st.w32
        return y.reshape(*np.shape(x)[:-1], -1)

    def logp():
        return [log_softmax(harness.model.forward(np.asarray(w), 0, 1.0)) for w in windows]

    for lin in harness.linears:
        lin.hook = hook
    out = {}
    try:
        exact = logp()
        names = [lin.name for lin in harness.linears]
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc="sensitivities", leave=False)
        for n in names:
            current["name"] = n
            kl = sum(float((np.exp(p) * (p - q)).sum()) for p, q in zip(exact, logp()))
            out[n] = kl / sum(len(w) for w in windows)
    finally:
        for lin in harness.linears:
            lin.hook = None
    return out


EFFORTS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)


def calibrate(
    harness,
    ids,
    n_windows: int = 2,
    length: int = 64,
    sens_efforts=(0.25, 0.5),
    efforts=EFFORTS,
    progress: bool = True,
) -> dict:
    """A profile from the second half of ``ids`` (never the evaluation windows, which start at
    token 0): capture inputs, measure error curves and per-matrix sensitivities, solve."""
    from pyeffort.eval.harness import windows

    start = max(len(ids) // 2, harness.windows.size)
    length = min(length, (len(ids) - start) // n_windows)
    cal = windows(ids, n_windows, length, start)
    xs = harness.capture(cal)
    curves = error_curves(harness.states, xs, progress=progress)
    sizes = {n: st.size for n, st in harness.states.items()}
    kls = {e: sensitivities(harness, cal, e, progress=progress) for e in sens_efforts}
    table = sensitivity_table(curves, kls)
    sens = {n: float(np.exp(np.mean([np.log(t[n]) for t in table.values()]))) for n in curves}
    prof = solve(curves, sizes, efforts, sens)
    prof["single_matrix_kl"] = {str(e): v for e, v in kls.items()}
    prof["calibration_tokens"] = [int(start), int(start + n_windows * length)]
    return prof


def sensitivity_table(curves: dict, kls: dict[float, dict], grid=GRID) -> dict:
    """{effort: {name: s}} with s = KL of that matrix alone / its relative squared error there."""
    g = list(np.round(grid, 4))
    out = {}
    for e, kl in kls.items():
        j = g.index(round(e, 4))
        out[float(e)] = {n: max(kl[n], 1e-9) / max(curves[n][j], 1e-12) for n in curves}
    return out


def sens_at(table: dict, effort: float) -> dict:
    """Sensitivities at ``effort``: log-interpolated between the calibrated efforts, clamped."""
    es = sorted(table)
    if effort <= es[0] or len(es) == 1:
        return table[es[0]]
    if effort >= es[-1]:
        return table[es[-1]]
    k = int(np.searchsorted(es, effort)) - 1
    a, b = es[k], es[k + 1]
    t = (effort - a) / (b - a)
    return {
        n: float(np.exp((1 - t) * np.log(table[a][n]) + t * np.log(table[b][n]))) for n in table[a]
    }


def main(argv=None) -> int:
    """Calibrate a profile for a model on the second half of a text (the evaluation windows of
    ``pyeffort eval`` start at token 0) and write it as JSON."""
    import argparse

    from pyeffort.eval import cli
    from pyeffort.eval.harness import Harness, windows
    from pyeffort.models.profiles import allocation

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--text", required=True, help="UTF-8 text (e.g. Botchan)")
    p.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke runs)")
    p.add_argument("--windows", type=int, default=2, help="calibration windows (default 2)")
    p.add_argument("--length", type=int, default=64, help="tokens per window (default 64)")
    p.add_argument("--out", required=True, help="the profile (JSON)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.start, args.out_weights = "0", "auto"
    model, ids, _ = cli.load(args)
    h = Harness(model, windows(ids, 1, args.length), progress=not args.no_progress)
    prof = calibrate(h, ids, args.windows, args.length, progress=not args.no_progress)
    allocation.save(prof, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
