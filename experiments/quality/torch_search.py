"""Searching for a budget split on a GPU with the torch twin (``torch_twin``), on calibration
text only (windows spread over the second half of the text, never the evaluation windows).

Stage ``measure``: exact inputs of every matrix on the calibration windows, error curves
``E_m(e)``, single-matrix KLs at a few efforts, the profiles ``calibrate.solve`` makes of them,
and the KL of each candidate on the calibration, held-out and evaluation windows (the evaluation
windows are reported, never used to choose). Stage ``search``: coordinate search of per-type and
per-layer multipliers on top of the best measured profile, judged by the calibration KL.

python experiments/quality/torch_search.py --gguf M.gguf --ids ids.npy --stage measure --state S
    [--out-weights pyeffort/models/profiles/M.out_weights.safetensors]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import calibrate as C
import numpy as np
import torch
from torch_twin import TYPES, TwinLlama, exact_hook, kl_per_token

from pyeffort.models.profiles import allocation as A
from pyeffort.models.profiles import out_weights

EFFORTS = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
PROFILE_EFFORTS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
GRID = np.unique(np.round(np.concatenate([C.GRID, [0.15, 0.35, 0.45]]), 4))


def windows(ids, n_cal=12, n_hold=4, length=256, n_eval=4):
    """eval: from token 0; cal: n_cal windows evenly spread over the second half; hold: windows
    half-way between calibration windows (also second half)."""
    n = len(ids)
    lo, hi = n // 2, n - length
    starts = np.linspace(lo, hi, n_cal).astype(int)
    gap = (starts[1] - starts[0]) // 2
    hold = np.minimum(starts[:n_hold] + gap, hi).astype(int)

    def take(ss):
        return np.stack([ids[s : s + length] for s in ss])

    ev = ids[: n_eval * length].reshape(n_eval, length)
    return {"eval": ev, "cal": take(starts), "hold": take(hold)}, starts.tolist(), hold.tolist()


class Bench:
    def __init__(self, model: TwinLlama, sets: dict):
        self.m = model
        self.sets = {k: torch.from_numpy(np.asarray(v)).to(model.device) for k, v in sets.items()}
        self.exact = {}
        for k, t in self.sets.items():
            self.exact[k] = torch.log_softmax(model.forward(t, exact_hook).double(), -1)

    def kl(self, efforts: dict, which=("cal",)) -> dict:
        """mean KL per set with matrix ``name`` at ``efforts[name]`` (missing: exact)."""
        acc = {"mults": 0, "size": 0}

        def hook(name, mat, x):
            e = efforts.get(name, 1.0)
            y, mults = mat(x, e)
            acc["mults"] += mults
            acc["size"] += x.shape[0] * mat.size
            return y

        out = {}
        for k in which:
            out[k] = float(kl_per_token(self.exact[k], self.m.forward(self.sets[k], hook)).mean())
        out["realised"] = float(acc["mults"]) / max(acc["size"], 1)
        return out


def capture(model: TwinLlama, tokens: torch.Tensor) -> dict:
    xs = {}

    def hook(name, mat, x):
        xs[name] = x.clone()
        return x @ mat.w32

    model.forward(tokens, hook)
    return xs


def error_curves(model, xs, grid=GRID) -> dict:
    out = {}
    for name, x in xs.items():
        m = model.mats[name]
        ex = x @ m.w32
        energy = float((ex.double() ** 2).sum()) or 1.0
        errs = []
        for e in grid:
            y, _ = m(x, float(e))
            errs.append(float(((y - ex).double() ** 2).sum()) / energy)
        out[name] = np.asarray(errs)
    return out


def single_kls(bench: Bench, names, effort: float) -> dict:
    return {n: bench.kl({n: effort})["cal"] for n in names}


def profile_efforts(model, prof, effort):
    names = model.names
    sizes = [model.mats[n].size for n in names]
    return A.Allocation(names, sizes, prof).efforts(effort)


def scaled(prof: dict, mult: dict) -> dict:
    """The profile with each matrix's weights multiplied by ``mult[name]`` (a per-effort list)."""
    w = {n: [v * m for v, m in zip(row, mult[n])] for n, row in prof["weights"].items()}
    return {**prof, "weights": w}


def measure(model, bench, args, log):
    names = model.names
    sizes = {n: model.mats[n].size for n in names}
    res = {"candidates": {}}
    t0 = time.time()
    shipped = A.load(args.shipped) if args.shipped else None
    cands = {"uniform": None}
    if shipped:
        cands["shipped"] = shipped
    xs = capture(model, bench.sets["cal"])
    curves = error_curves(model, xs)
    del xs
    log(f"error curves {time.time() - t0:.0f}s")
    kls = {}
    for e in args.sens_efforts:
        kls[e] = single_kls(bench, names, e)
        log(f"single-matrix KL at {e} {time.time() - t0:.0f}s")
    table = C.sensitivity_table(curves, kls, GRID)
    geo = {n: float(np.exp(np.mean([np.log(t[n]) for t in table.values()]))) for n in names}
    cands["sens_geo"] = C.solve(curves, sizes, PROFILE_EFFORTS, geo, GRID)
    cands["sens_interp"] = C.solve(curves, sizes, PROFILE_EFFORTS, table, GRID)
    for name, prof in cands.items():
        r = {}
        for e in EFFORTS:
            eff = profile_efforts(model, prof, e)
            r[str(e)] = bench.kl(eff, ("cal", "hold", "eval"))
        res["candidates"][name] = r
        log(f"{name}: " + " ".join(f"{e}:{v['cal']:.4f}/{v['eval']:.4f}" for e, v in r.items()))
    res["single_matrix_kl"] = {str(e): v for e, v in kls.items()}
    res["curves"] = {n: c.tolist() for n, c in curves.items()}
    res["profiles"] = {k: v for k, v in cands.items() if v is not None}
    return res


def search(model, bench, start: dict, efforts, budget_s: float, log, steps=(1.3, 1 / 1.3)):
    """Coordinate search of per-type and per-layer multipliers at each effort (cal KL)."""
    names = model.names
    groups = {f"type:{t}": [n for n in names if n.endswith(t)] for t in TYPES}
    for i in range(0, model.n_layers, 3):  # blocks of 3 layers
        blk = {f"layers.{j}." for j in range(i, i + 3)}
        groups[f"layers:{i}-{i + 2}"] = [n for n in names if n[: n.index(".", 7) + 1] in blk]
    grid = list(start["efforts"])
    mult = {n: [1.0] * len(grid) for n in names}
    t0 = time.time()
    trace = {}
    per = budget_s / len(efforts)
    for e in efforts:
        j = grid.index(e)
        t_e = time.time()

        def cal_kl(mult=mult, e=e):
            return bench.kl(profile_efforts(model, scaled(start, mult), e))["cal"]

        best = cal_kl()
        trace[str(e)] = [best]
        improved = True
        while improved and time.time() - t_e < per:
            improved = False
            for members in groups.values():
                if time.time() - t_e > per:
                    break
                for s in steps:
                    for n in members:
                        mult[n][j] *= s
                    v = cal_kl()
                    if v < best - 1e-5:
                        best, improved = v, True
                        trace[str(e)].append(best)
                        break
                    for n in members:
                        mult[n][j] /= s
        log(f"search {e}: {trace[str(e)][0]:.4f} -> {best:.4f} ({time.time() - t0:.0f}s)")
    return scaled(start, mult), trace


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--stage", choices=("measure", "search", "dynamic", "marginal"), required=True)
    p.add_argument("--state", required=True, help="folder kept between stages")
    p.add_argument("--out", required=True)
    p.add_argument("--shipped", default=None)
    p.add_argument(
        "--out-weights",
        default=None,
        help="per-output weights (.safetensors, as shipped) for the output-weighted statistic",
    )
    p.add_argument("--sens-efforts", default="0.15,0.25,0.5")
    p.add_argument("--n-cal", type=int, default=12)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--budget-s", type=float, default=400)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.sens_efforts = [float(v) for v in args.sens_efforts.split(",")]
    out, state = Path(args.out), Path(args.state)
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    t00 = time.time()

    def log(s):
        line = f"[{time.time() - t00:6.1f}s] {s}"
        print(line, flush=True)
        with open(out / f"{args.stage}.log", "a") as f:
            f.write(line + "\n")

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = np.load(args.ids)
    sets, cal_starts, hold_starts = windows(ids, args.n_cal, 4, args.length)
    ow = out_weights.load(args.out_weights) if args.out_weights else None
    model = TwinLlama(args.gguf, args.device, ow)
    log("model loaded")
    bench = Bench(model, sets)
    log("exact done")
    t = time.time()
    r = bench.kl(profile_efforts(model, None, 0.25), ("cal",))
    log(f"one uniform 0.25 pass on cal {time.time() - t:.2f}s: {r}")
    meta = {"cal_starts": cal_starts, "hold_starts": hold_starts, "length": args.length}
    if args.stage == "measure":
        res = measure(model, bench, args, log)
        res["meta"] = meta
        (state / "measure.json").write_text(json.dumps(res))
        (out / "measure.json").write_text(json.dumps(res))
    elif args.stage == "marginal":
        res = marginal(model, bench, args, log)
        res["meta"] = meta
        (out / "marginal.json").write_text(json.dumps(res))
    elif args.stage == "dynamic":
        res = dynamic(model, bench, args, log)
        res["meta"] = meta
        (out / "dynamic.json").write_text(json.dumps(res))
    else:
        res = json.loads((state / "measure.json").read_text())
        cands = res["candidates"]
        best_name = min(
            (k for k in cands if k != "uniform"),
            key=lambda k: sum(math.log(v["cal"]) for v in cands[k].values()),
        )
        log(f"start from {best_name}")
        start = res["profiles"][best_name]
        prof, trace = search(model, bench, start, list(EFFORTS), args.budget_s, log)
        r = {}
        for e in EFFORTS:
            r[str(e)] = bench.kl(profile_efforts(model, prof, e), ("cal", "hold", "eval"))
            log(f"searched {e}: {r[str(e)]}")
        prof["search_from"] = best_name
        (out / "search.json").write_text(
            json.dumps({"profile": prof, "trace": trace, "kl": r, "meta": meta})
        )
    log("done")


def joint_keep(mats, x: torch.Tensor, budgets, weights):
    """Per token, one cutoff over the rows of several matrices sharing the input ``x`` on
    ``sqrt(weight_m) * abs(x_i) * stat_m(k, i)``, filling ``sum(budgets)`` multiplications
    (each row costs its matrix's groups) -> the ranks each matrix keeps per input."""
    n = x.shape[0]
    scores, costs, sizes = [], [], []
    for m, w in zip(mats, weights):
        s = (x.abs()[:, None, :] * (m.stats * math.sqrt(w))[None]).reshape(n, -1)
        scores.append(s)
        costs.append(torch.full((s.shape[1],), float(m.mults_per_row), device=x.device))
        sizes.append(s.shape[1])
    s = torch.cat(scores, 1)
    cost = torch.cat(costs)
    order = torch.sort(s, dim=1, descending=True)
    cum = torch.cumsum(cost[order.indices], dim=1)
    hit = torch.searchsorted(cum, torch.full((n, 1), float(sum(budgets)), device=x.device))
    hit = hit.clamp(max=s.shape[1] - 1)
    c = order.values.gather(1, hit)  # (n, 1) the cutoff
    keeps, o = [], 0
    for m, sz in zip(mats, sizes):
        part = s[:, o : o + sz].reshape(n, 16, m.n_in) >= c[:, :, None]
        keeps.append(part.sum(1))
        o += sz
    return keeps


def dynamic_kl(model, bench, efforts: dict, weights: dict, which=("cal", "hold", "eval")):
    """KL with q/k/v and gate/up of each layer sharing one per-token cutoff (static budgets)."""
    groups = []
    for i in range(model.n_layers):
        p = f"layers.{i}."
        groups += [[p + "attn.wq", p + "attn.wk", p + "attn.wv"], [p + "ffn.w1", p + "ffn.w3"]]
    first = {g[0]: g for g in groups}
    member = {n for g in groups for n in g}
    stash, acc = {}, {"mults": 0, "size": 0}

    def hook(name, mat, x):
        if name in first:
            g = first[name]
            ms = [model.mats[n] for n in g]
            budgets = [efforts[n] * model.mats[n].size for n in g]
            for n, k in zip(g, joint_keep(ms, x, budgets, [weights[n] for n in g])):
                stash[n] = k
        if name in member:
            k = stash.pop(name)
            y = mat.product(x, k)
            mults = k.sum() * mat.mults_per_row
        else:
            y, mults = mat(x, efforts[name])
        acc["mults"] += mults
        acc["size"] += x.shape[0] * mat.size
        return y

    out = {}
    for k in which:
        out[k] = float(kl_per_token(bench.exact[k], model.forward(bench.sets[k], hook)).mean())
    out["realised"] = float(acc["mults"]) / max(acc["size"], 1)
    return out


def dynamic(model, bench, args, log):
    """Stage ``dynamic``: the best measured profile as static budgets, with per-token joint
    cutoffs inside q/k/v and gate/up, weights from sensitivities or energies alone."""
    res = json.loads((Path(args.state) / "measure.json").read_text())
    cands = res["candidates"]
    best = min(
        (k for k in cands if k != "uniform" and k in res["profiles"]),
        key=lambda k: sum(math.log(v["hold"]) for v in cands[k].values()),
    )
    prof = res["profiles"][best]
    log(f"static budgets from {best}")
    xs = capture(model, bench.sets["cal"])
    energy = {
        n: float((x @ model.mats[n].w32).double().pow(2).sum(1).mean()) for n, x in xs.items()
    }
    del xs
    kls = {float(e): v for e, v in res["single_matrix_kl"].items()}
    curves = {n: np.asarray(c) for n, c in res["curves"].items()}
    table = C.sensitivity_table(curves, kls, GRID)
    out = {"static_from": best, "kl": {}}
    for e in EFFORTS:
        eff = profile_efforts(model, prof, e)
        sens = C.sens_at(table, e)
        variants = {
            "static": None,
            "joint_sens": {n: sens[n] / energy[n] for n in model.names},
            "joint_energy": {n: 1.0 / energy[n] for n in model.names},
            "joint_plain": {n: 1.0 for n in model.names},
        }
        out["kl"][str(e)] = {}
        for v, w in variants.items():
            r = (
                bench.kl(eff, ("cal", "hold", "eval"))
                if w is None
                else dynamic_kl(model, bench, eff, w)
            )
            out["kl"][str(e)][v] = r
            log(f"{e} {v}: {r}")
    return out


MARGINAL_ORDER = (0.25, 0.5, 0.15, 0.2, 0.3, 0.4)


def marginal(model, bench, args, log, delta=0.1, gammas=(0.25, 0.5, 1.0)):
    """Stage ``marginal``: in-context marginal values. At each effort, with every matrix at its
    profile effort, the calibration KL saved per extra multiplication when one matrix gets
    ``delta`` more effort: ``lam_m``. Then the weights move towards equal marginal values,
    ``w_m * (lam_m / median lam) ** gamma`` (factor clipped to [1/2, 2]); the gamma with the
    lowest held-out KL is kept, per effort (or none, if none beats the start there)."""
    res = json.loads((Path(args.state) / "measure.json").read_text())
    cands = res["candidates"]
    best = min(
        (k for k in cands if k != "uniform" and k in res["profiles"]),
        key=lambda k: sum(math.log(v["hold"]) for v in cands[k].values()),
    )
    prof = json.loads(json.dumps(res["profiles"][best]))
    log(f"start from {best}")
    names = model.names
    grid = list(prof["efforts"])
    out = {"start": best, "kl": {}, "lam": {}}
    t0 = time.time()
    for e in MARGINAL_ORDER:
        if time.time() - t0 > args.budget_s:
            log(f"budget spent; {e} left as it was")
            break
        eff = profile_efforts(model, prof, e)
        base = bench.kl(eff, ("cal", "hold", "eval"))
        lam = {}
        for n in names:
            up = min(1.0, eff[n] + delta)
            if up <= eff[n] + 1e-9:
                lam[n] = float("nan")  # saturated
                continue
            kl = bench.kl({**eff, n: up})["cal"]
            lam[n] = (base["cal"] - kl) / ((up - eff[n]) * model.mats[n].size)
        finite = np.array([v for v in lam.values() if np.isfinite(v) and v > 0])
        med = float(np.median(finite))
        j = grid.index(e)
        rows = {"start": base}
        best_g, best_hold, best_w = None, base["hold"], None
        for g in gammas:
            w = {}
            for n in names:
                f = lam[n] / med if np.isfinite(lam[n]) else 2.0
                f = min(2.0, max(0.5, f)) ** g if f > 0 else 0.5**g
                w[n] = prof["weights"][n][j] * f
            trial = {**prof, "weights": {n: list(prof["weights"][n]) for n in names}}
            for n in names:
                trial["weights"][n][j] = w[n]
            r = bench.kl(profile_efforts(model, trial, e), ("cal", "hold", "eval"))
            rows[f"gamma {g}"] = r
            if r["hold"] < best_hold:
                best_g, best_hold, best_w = g, r["hold"], w
        if best_w is not None:
            for n in names:
                prof["weights"][n][j] = best_w[n]
        rows["kept"] = best_g
        out["kl"][str(e)] = rows
        out["lam"][str(e)] = lam
        log(
            f"{e}: "
            + "; ".join(f"{k}: {v}" for k, v in rows.items())
            + f" ({time.time() - t0:.0f}s)"
        )
    out["profile"] = prof
    return out


if __name__ == "__main__":
    main()
