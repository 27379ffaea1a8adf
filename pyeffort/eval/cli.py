"""``pyeffort eval``: the quality harness from the command line.

pyeffort eval --text botchan.txt --rules pyeffort,teal,wina --efforts 0.25,0.5 --out OUT

(Botchan, the text of docs/RESULTS.md: python scripts/fetch_botchan.py botchan.txt)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_RULES = "pyeffort,original,teal,wina,int8"
DEFAULT_EFFORTS = "0.15,0.2,0.25,0.3,0.4,0.5"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="quality of each effort against the exact model",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    configure(p)
    p.set_defaults(func=run)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (tests, smoke runs)")
    p.add_argument(
        "--rules",
        default=DEFAULT_RULES,
        help=f"comma list of {sorted(_rules())} (default {DEFAULT_RULES})",
    )
    p.add_argument("--efforts", default=DEFAULT_EFFORTS, help="comma list of efforts in (0, 1]")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    p.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument(
        "--text",
        required=True,
        help="the evaluation text: any UTF-8 file (docs/RESULTS.md uses Botchan: "
        "python scripts/fetch_botchan.py botchan.txt)",
    )
    p.add_argument(
        "--start",
        default="0",
        help="where the evaluation windows begin: a token index (default 0), or a piece of the "
        "text whose first occurrence marks it (e.g. 'CHAPTER I': Botchan's story itself, past "
        "the Project Gutenberg header and the translator's preface)",
    )
    p.add_argument(
        "--profile",
        default="auto",
        help="budget split for the default rule: 'auto' (the profile shipped for the model, "
        "else uniform), 'uniform', or a JSON profile path (experiments/quality/calibrate.py "
        "makes one for another model)",
    )
    p.add_argument(
        "--out-weights",
        default="auto",
        choices=["auto", "none"],
        help="per-output weights of the build: 'auto' (those shipped for the model, if any; "
        "stat rms_out_weighted) or 'none' (the plain RMS statistic)",
    )
    p.add_argument("--out", default="quality-out", help="folder for quality.md/.json/.png")
    p.add_argument(
        "--speed",
        action="store_true",
        help="also time one decode token through all matrices per rule and effort, "
        "and compare KL at equal measured speed-up",
    )
    p.add_argument(
        "--merge",
        nargs="*",
        help="quality.json files of earlier runs (same model and windows) to report with these",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "metal"), default="auto",
                   help="the rules run as numpy hooks: cpu only for now (auto: cpu)")  # fmt: skip


def _rules():
    from pyeffort.eval.rules import RULES

    return RULES


def _split_rules():
    from pyeffort.eval.rules import SPLIT_RULES

    return SPLIT_RULES


def _floats(s: str) -> list[float]:
    try:
        vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"pyeffort eval: bad effort list {s!r}") from exc
    if not vals or any(not 0.0 < v <= 1.0 for v in vals):
        raise SystemExit(f"pyeffort eval: efforts must lie in (0, 1], got {s!r}")
    return vals


def load(args):
    """-> (model, token ids of the text, model id)."""
    from pyeffort import models
    from pyeffort.eval import tiny

    raw = read_text(args.text)
    if args.tiny:
        m = tiny.tiny_random()
        ids = np.frombuffer(raw.encode("utf-8"), np.uint8).astype(np.int64) % m.args.vocab_size
        args.start = window_start(args.start, raw, lambda t: t.encode("utf-8"))  # a byte a token
        return m, ids, "tiny-random"
    path = args.model or default_gguf()
    model = models.load(path, out_weights=None if args.out_weights == "none" else "auto")
    ids = _encode(model.tokenizer, raw)
    args.start = window_start(args.start, raw, lambda t: _encode(model.tokenizer, t))
    return model, ids, Path(path).name


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"pyeffort eval: --text {path} is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise SystemExit(f"pyeffort eval: cannot read --text {path}: {exc}") from exc


def _encode(tok, text: str) -> np.ndarray:
    ids = tok.encode(text)
    return np.asarray(getattr(ids, "ids", ids), dtype=np.int64)  # tokenizers.Encoding or a list


def window_start(start, raw: str, encode) -> int:
    """--start -> a token index: an int as it is, else the token where the text ``start``
    first occurs in ``raw`` (the number of tokens of the text before it)."""
    try:
        return int(start)
    except ValueError:
        at = raw.find(start)
        if at < 0:
            raise SystemExit(f"pyeffort eval: --start {start!r} does not occur in the text")
        return len(encode(raw[:at]))


def default_gguf() -> str:
    from pyeffort.models.default import default_gguf

    try:
        return str(default_gguf())
    except FileNotFoundError as exc:
        raise SystemExit(f"pyeffort eval: no --model given and {exc}") from exc


def out_weights_shipped(model_id: str) -> bool:
    from pyeffort.models.profiles import out_weights

    return out_weights.shipped(model_id) is not None


def profile_for(args, model_id: str):
    """The budget split of the default rule: None (uniform) or a profile dict."""
    from pyeffort.models.profiles import allocation

    if args.profile == "uniform":
        return None
    if args.profile != "auto":
        return allocation.load(args.profile)
    shipped = allocation.shipped(model_id)
    return allocation.load(shipped) if shipped is not None and not args.tiny else None


def run(args) -> int:
    from pyeffort.errors import BackendError
    from pyeffort.eval import report
    from pyeffort.eval.harness import Harness, windows

    if args.device not in ("auto", "cpu"):
        raise BackendError(f"--device {args.device}: eval runs its rules on the CPU only")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in _rules()]
    if bad:
        raise SystemExit(f"pyeffort eval: unknown rules {bad}; choose from {sorted(_rules())}")
    efforts = _floats(args.efforts)
    merged = []
    for path in args.merge or []:
        merged += json.loads(Path(path).read_text())["results"]
    model, ids, model_id = load(args)
    ev = windows(ids, args.windows, args.length, args.start)
    h = Harness(model, ev, progress=not args.no_progress)
    prof = (
        profile_for(args, model_id)
        if {"pyeffort", "pyeffort_q8", "bucket_twin"} & ({*rules} | {r["rule"] for r in merged})
        else None
    )
    h.allocation = type(h.allocation)(h.allocation.names, h.allocation.sizes, prof)
    # the default rule on a model that has shipped weights but was built without them
    plain = args.out_weights == "none" and out_weights_shipped(model_id)
    results = []
    for rule in rules:
        for e in efforts if rule not in ("int8", "q8_0") else [1.0]:
            r = h.run(rule, e).as_dict()
            r["label"] = report.label(
                rule, prof is not None and rule in _split_rules(), plain
            )
            results.append(r)
            print(
                f"{r['label']:55s} effort {e:.2f} realised {r['realised']:.4f} "
                f"KL {r['kl']:.4f} top1 {r['top1']:.3f}",
                file=sys.stderr,
            )
    results = merged + results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model_id,
        "windows": args.windows,
        "start": args.start,
        "length": args.length,
        "exact_ppl": h.exact_ppl(),
        "profile": args.profile,
        "stats": sorted({lin.buckets.stat for lin in h.linears}),
    }
    md = (
        f"Model {model_id}, {args.windows} windows x {args.length} tokens from token "
        f"{args.start}, exact perplexity "
        f"{meta['exact_ppl']:.3f}\n\n" + report.markdown(results)
    )
    md += "\nAt equal realised effort:\n\n" + report.equal_effort(results, efforts)
    if args.speed:
        md += "\n" + equal_time(h, results, meta)
    if any(r.get("speedup") for r in results):
        md += report.equal_time_table(results)
    report.write_text(out / "quality.md", md)
    report.write_json(results, out / "quality.json", meta)
    report.plots(results, out, speedups=any(r.get("speedup") for r in results))
    print(md)
    return 0


def equal_time(h, results: list[dict], meta: dict) -> str:
    """Times every rule's efforts on one decode token, attaches ``speedup`` to the results and
    returns a markdown table of KL at speed-ups 1.5x, 2x and 3x."""
    from pyeffort.eval import speed

    xs = {n: x[-1] for n, x in h.capture(h.windows[:1, :32]).items()}
    timed = [r for r in ("pyeffort", "teal", "wina") if any(x["rule"] == r for x in results)]
    efforts = {r: sorted({x["effort"] for x in results if x["rule"] == r}) for r in timed}
    sp = speed.speedups(h, xs, efforts)
    for x in results:
        if x["rule"] in sp:
            x["speedup"] = sp[x["rule"]].get(x["effort"])
    meta["speed"] = {
        k: (v if not isinstance(v, dict) else {str(e): s for e, s in v.items()})
        for k, v in sp.items()
    }
    return (
        "Speed-up over our dense fp16 product, one token through all matrices "
        f"(dense {sp['dense_s'] * 1e3:.1f} ms; channel kernel: {sp['rows_kernel']})\n\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pyeffort-eval", description=__doc__)
    configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
