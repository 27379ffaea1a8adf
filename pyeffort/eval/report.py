"""Results of the quality harness as a markdown table, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {
    "pyeffort": "(e) pyeffort default",
    "pyeffort_q8": "(e8) pyeffort default, 8-bit values",
    "bucket_twin": "(e) pyeffort default (numpy twin)",
    "original": "(a) original Effort (probes, mean abs(w), truncated)",
    "original_exact": "(a') original stat+truncation, exact budget",
    "teal": "(b) TEAL channels by abs(x)",
    "wina": "(c) WINA channels by abs(x)*norm(W_i)",
    "int8": "(d) dense int8 per-channel",
    "q8_0": "(d8) dense Q8_0 (int8, a scale per 32 inputs)",
    "oracle": "(f) per-matrix oracle",
    "dense": "exact (dense fp16)",
}


def label(rule: str, allocated: bool = False, plain: bool = False) -> str:
    """``plain``: the default rule built without the model's per-output weights (its row
    statistic the plain RMS), marked (e') so that it is not taken for the default."""
    base = LABELS.get(rule, rule)
    if plain and base.startswith("(e)"):
        base = "(e')" + base[3:] + ", plain RMS statistic"
    return base + (" + budget split" if allocated else "")


def markdown(results: list[dict]) -> str:
    head = (
        "| rule | effort asked | realised | KL (nats/token) | top-1 | ppl | cosine "
        "| MB read/token | s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        rows.append(
            f"| {r.get('label', r['rule'])} | {r['effort']:.2f} | {r['realised']:.4f} "
            f"| {r['kl']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} | {r['cosine']:.4f} "
            f"| {r['bytes_per_token'] / 1e6:.2f} | {r['seconds']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def write_json(results: list[dict], path, meta: dict | None = None) -> None:
    write_text(path, json.dumps({"meta": meta or {}, "results": results}, indent=1))


def interp_at(
    results: list[dict], rule_label: str, x_key: str, x: float, slack: float = 0.01
) -> float | None:
    """KL of one rule's curve at ``x`` of ``x_key``, log-linear between measured points (and
    along the end segment up to ``slack`` past the ends); None further out."""
    pts = sorted(
        (r[x_key], r["kl"])
        for r in results
        if r.get("label", r["rule"]) == rule_label and r.get(x_key) is not None
    )
    if len(pts) < 2 or not pts[0][0] - slack <= x <= pts[-1][0] + slack:
        return None
    xs = np.array([p[0] for p in pts])
    ks = np.log(np.maximum([p[1] for p in pts], 1e-12))
    k = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = (x - xs[k]) / max(xs[k + 1] - xs[k], 1e-12)
    return float(np.exp(ks[k] + t * (ks[k + 1] - ks[k])))


def plots(results: list[dict], folder, speedups: dict | None = None, prefix: str = "quality"):
    """KL against realised effort (and against measured speed-up when given). Returns the paths
    written, or [] with a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pyeffort eval: matplotlib is not installed, no plots (pip install 'pyeffort[eval]')")
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series: dict[str, list] = {}
    for r in results:
        series.setdefault(r.get("label", r["rule"]), []).append(r)
    effort = {n: sorted((r["realised"], r["kl"]) for r in rs) for n, rs in series.items()}
    path = folder / f"{prefix}_kl_vs_effort.png"
    written = [_plot(plt, effort, "realised effort (fraction of multiplications)", path)]
    if speedups:
        speed = {
            n: sorted((r["speedup"], r["kl"]) for r in rs if r.get("speedup"))
            for n, rs in series.items()
        }
        xlabel = "measured speed-up over our dense fp16 product (all matrices, 1 token)"
        written.append(_plot(plt, speed, xlabel, folder / f"{prefix}_kl_vs_speedup.png"))
    return written


def _plot(plt, curves: dict[str, list], xlabel: str, path: Path) -> Path:
    """One PNG: KL (log scale) against ``xlabel``, a line per name (a lone point as a square)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), "s" if len(pts) == 1 else "o-", label=name, ms=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL(exact || approx), nats/token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def equal_effort(results: list[dict], efforts) -> str:
    """Markdown: every rule's KL at the same *realised* efforts (log-interpolated along its
    curve; '-' outside the measured range), and whether the default rule is below (a), (b), (c)."""
    labels = list(dict.fromkeys(r.get("label", r["rule"]) for r in results))
    labels = [lb for lb in labels if sum(r.get("label", r["rule"]) == lb for r in results) > 1]
    head = "| realised effort | " + " | ".join(labels) + " | default below a, b, c |\n"
    head += "|---" * (len(labels) + 2) + "|\n"
    rows = []
    default = [lb for lb in labels if lb.startswith("(e)") and "budget split" in lb]
    peers = [lb for lb in labels if lb[:3] in ("(a)", "(b)", "(c)")]
    for e in efforts:
        kl = {lb: interp_at(results, lb, "realised", e) for lb in labels}
        cells = ["-" if kl[lb] is None else f"{kl[lb]:.4f}" for lb in labels]
        verdict = "-"
        if default and kl[default[0]] is not None and all(kl[p] is not None for p in peers):
            verdict = "yes" if all(kl[default[0]] < kl[p] for p in peers) else "NO"
        rows.append(f"| {e:.2f} | " + " | ".join(cells) + f" | {verdict} |")
    return head + "\n".join(rows) + "\n"


def equal_time_table(results: list[dict], targets=(1.5, 2.0, 3.0)) -> str:
    """Markdown: KL of the default rule and of the best channel rule at equal measured speed-up
    (log-interpolated along each curve of KL against speed-up)."""
    labels = {}
    for r in results:  # per rule its first label; for pyeffort the default's, not a variant's
        lb = r.get("label", r["rule"])
        if r.get("speedup") and (r["rule"] not in labels or lb.startswith("(e) ")):
            labels[r["rule"]] = lb
    lines = ["| speed-up | pyeffort KL | best channel rule KL | which |", "|---|---|---|---|"]

    def fmt(v):
        return "out of measured range" if v is None else f"{v:.4f}"

    for t in targets:
        ours = (
            interp_at(results, labels["pyeffort"], "speedup", t) if "pyeffort" in labels else None
        )
        peers = [
            (interp_at(results, labels[r], "speedup", t), r)
            for r in ("teal", "wina")
            if r in labels
        ]
        peers = [p for p in peers if p[0] is not None]
        best = min(peers) if peers else (None, "-")
        lines.append(f"| {t:g}x | {fmt(ours)} | {fmt(best[0])} | {best[1]} |")
    return "\n".join(lines) + "\n"
