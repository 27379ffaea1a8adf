"""Quality of 8-bit (and 4-bit) bucket values, simulated on the default model (issue 19).

Each matrix's bucket values are quantised to int8 (or int4) with one scale per block of B
groups of a bucket row (B = 0: one scale per row), dequantised, and run through
pyeffort.matmul with the model's shipped build and budget split; the dense baselines quantise W
itself (ggml's Q8_0 / Q4_0 layout: one scale per 32 inputs of an output) and run dense. KL
against the exact fp16 model on Botchan windows (the README's windows, or --start "CHAPTER I").

python experiments/q8/quality_q8.py [--start "CHAPTER I"] [--variants q8b32,q8row,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import pyeffort
from pyeffort.eval import rules as R
from pyeffort.eval.cli import _encode, default_gguf, window_start
from pyeffort.eval.harness import Harness, windows

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "scripts"))
import fetch_botchan  # noqa: E402


def quant_blocks(v: np.ndarray, block: int, levels: int, scale_dtype) -> np.ndarray:
    """v (rows, n) float32 -> dequantised float32: symmetric ints in [-levels, levels], one
    scale (absmax / levels, stored as scale_dtype) per block of `block` values of a row (block 0:
    one per row)."""
    rows, n = v.shape
    b = n if block == 0 else block
    pad = (-n) % b
    w = np.pad(v, ((0, 0), (0, pad))).reshape(rows, -1, b)
    scale = (np.abs(w).max(-1, keepdims=True) / levels).astype(scale_dtype).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / safe), -levels, levels)
    return (q * scale).reshape(rows, -1)[:, :n]


def quant_tiers(B: pyeffort.Buckets, block: int, levels: int, scale_dtype) -> np.ndarray:
    """The values (16 n_in, G) dequantised with one scale per tier (ranks 4t..4t+3) of an input
    and block of `block` groups (0: the whole row), shared by the tier's 4 rows."""
    n_in, v = B.n_in, np.asarray(B.values, np.float32)
    G = v.shape[1]
    inv = np.argsort(B.order, axis=1)  # row of input i in rank k
    byin = np.stack([v.reshape(16, n_in, G)[k][inv[k]] for k in range(16)])  # (16, n_in, G)
    t = byin.reshape(4, 4, n_in, G).transpose(0, 2, 1, 3)  # (tier, input, 4 ranks, G)
    b = G if block == 0 else block
    tb = np.pad(t, ((0, 0), (0, 0), (0, 0), (0, (-G) % b))).reshape(4, n_in, 4, -1, b)
    scale = (np.abs(tb).max(axis=(2, 4), keepdims=True) / levels).astype(scale_dtype)
    scale = scale.astype(np.float32)
    q = np.clip(np.rint(tb / np.where(scale > 0, scale, 1.0)), -levels, levels)
    dq = (q * scale).reshape(4, n_in, 4, -1)[..., :G].transpose(0, 2, 1, 3).reshape(16, n_in, G)
    return np.stack([dq[k][B.order[k]] for k in range(16)]).reshape(16 * n_in, G)


def bucket_variant(B: pyeffort.Buckets, block: int, levels: int, scale_dtype,
                   tier: bool = False) -> pyeffort.Buckets:
    if tier:
        deq = quant_tiers(B, block, levels, scale_dtype)
    else:
        deq = quant_blocks(np.asarray(B.values, np.float32), block, levels, scale_dtype)
    return pyeffort.Buckets(deq.astype(np.float16), B.positions, B.stats, B.order, B.n_out,
                            B.source_dtype, B.stat)


def dense_quant(w16: np.ndarray, levels: int) -> np.ndarray:
    """ggml-style: W (n_in, n_out), one fp16 scale per 32 inputs of each output."""
    wt = w16.astype(np.float32).T  # (n_out, n_in): blocks along the inputs
    return quant_blocks(wt, 32, levels, np.float16).T.copy()


VARIANTS = {  # name -> (block in groups, levels, scale dtype)
    "q8row": (0, 127, np.float32),
    "q8b64": (64, 127, np.float32),
    "q8b32": (32, 127, np.float32),
    "q8b32h": (32, 127, np.float16),
    "q4b32": (32, 7, np.float32),
    "q4b16": (16, 7, np.float32),
    "q8tier": (0, 127, np.float32, True),
    "q8tierb32": (32, 127, np.float32, True),
    "q8tierb16": (16, 127, np.float32, True),
    "q8tierb8": (8, 127, np.float32, True),
    "q8tierb4": (4, 127, np.float32, True),
    "q4tierb16": (16, 7, np.float32, True),
    "q4tierb8": (8, 7, np.float32, True),
    "q4tierb4": (4, 7, np.float32, True),
}


def weight_errors(h: Harness, names) -> dict:
    """Relative Frobenius error of the dequantised weights, over the whole model."""
    out = {}
    for name in names:
        num = den = 0.0
        for st in h.states.values():
            w = st.w32
            if name.startswith("dense"):
                dq = dense_quant(st.w16, 127 if name == "dense_q8" else 7)
            else:
                dq = bucket_variant(st.buckets, *VARIANTS[name]).to_dense().astype(np.float32)
            num += float(((dq - w) ** 2).sum())
            den += float((w**2).sum())
        out[name] = (num / den) ** 0.5
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--start", default="0")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--variants", default="q8b32,q8row,q4b32")
    p.add_argument("--efforts", default="1.0,0.5,0.25")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from pyeffort import models
    from pyeffort.models.profiles import allocation

    model = models.load(default_gguf())
    raw = fetch_botchan.botchan()
    ids = _encode(model.tokenizer, raw)
    start = window_start(a.start, raw, lambda t: _encode(model.tokenizer, t))
    h = Harness(model, windows(ids, a.windows, a.length, start), progress=False)
    prof = allocation.load(allocation.shipped(default_gguf()))
    h.allocation = type(h.allocation)(h.allocation.names, h.allocation.sizes, prof)
    original = {n: st.buckets for n, st in h.states.items()}
    variants = [v for v in a.variants.split(",") if v]
    efforts = [float(e) for e in a.efforts.split(",")]
    rows = {"start": a.start, "windows": a.windows, "length": a.length}
    rows["weight_rel_error"] = weight_errors(h, variants + ["dense_q8", "dense_q4"])
    print(json.dumps(rows["weight_rel_error"]), file=sys.stderr)
    for lv, name in ((127, "dense_q8"), (7, "dense_q4")):
        R.RULES[name] = (lambda lv: lambda x, st, e: (
            x @ st.get(f"dq{lv}", lambda: dense_quant(st.w16, lv)), x.shape[0] * st.size, 0))(lv)
        r = h.run(name, 1.0, allocate=False)
        rows[f"{name}@1.0"] = r.kl
        print(f"{name} 1.0 KL {r.kl:.5f}", file=sys.stderr)
    for v in ["f16"] + variants:
        for n, st in h.states.items():
            st._buckets = original[n] if v == "f16" else bucket_variant(original[n], *VARIANTS[v])
        for e in efforts:
            if v == "f16" and e == 1.0:
                continue
            t0 = time.time()
            r = h.run("pyeffort", e)
            rows[f"{v}@{e}"] = r.kl
            print(f"{v} {e} KL {r.kl:.5f} top1 {r.top1:.3f} realised {r.realised:.4f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
    text_out = json.dumps(rows, indent=1)
    if a.out:
        open(a.out, "w").write(text_out)
    print(text_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
