"""Regenerate the shipped per-output weights of the default model (issue 6, ``fisher``).

a_j of each matrix = sqrt(mean over calibration tokens of (d log q(y) / d out_j)^2), y sampled
from the exact model (``samples`` draws per position), normalised to mean 1 per matrix: the
diagonal Fisher information of the matrix's outputs (``quality_stat.fisher_weights``, the torch
twin). Calibration text: the 24 calibration windows of experiments/README.md (24 x 256 tokens of
Botchan's second half), never the evaluation windows (tokens 0..1023); 8 draws per position.

The twin keeps GGUF's interleaved q/k layout; pyeffort.models undoes it, so the q/k weights are
permuted the same way before saving (checked against the loader's matrices).

python experiments/quality/fisher_weights.py --device cuda   # the shipped file (H200: 2 s of compute)
python experiments/quality/fisher_weights.py                 # on CPU: the draws come from another generator,
                                               # so the weights differ a little (~30 min, 1 core)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_search as S
from quality_stat import fisher_weights
from torch_twin import TwinLlama

from pyeffort.models import profiles
from pyeffort.models.default import default_gguf
from pyeffort.models.loaders import open_source
from pyeffort.models.loaders.gguf import unpermute
from pyeffort.models.profiles import out_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fetch_botchan import botchan  # noqa: E402


def calibration(ids, n: int, every: int = 1, length: int = 256):
    """n windows spread over the second half as the split's calibration windows are (n = 24:
    those), every ``every``-th, without any that overlaps a held-out window of the split's set
    (tokens) or the evaluation windows (the first 1024 tokens)."""
    sets, starts, _ = S.windows(ids, n, 4, length)
    _, _, hold = S.windows(ids, 24, 4, length)
    keep = [
        i
        for i in range(0, n, every)
        if all(abs(starts[i] - h) >= length for h in hold) and starts[i] >= 4 * length
    ]
    return sets["cal"][keep], [starts[i] for i in keep]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=24, help="windows spread over the second half")
    p.add_argument("--every", type=int, default=1, help="every N-th of those windows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: the shipped file")
    p.add_argument("--gguf", default=None, help="default: the default model's GGUF")
    p.add_argument(
        "--ids", default=None, help="Botchan's token ids (.npy; default: tokenised here)"
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    src = open_source(gguf)
    if args.ids:
        ids = np.load(args.ids)
    else:
        enc = src.tokenizer.encode(botchan())
        ids = np.asarray(getattr(enc, "ids", enc), dtype=np.int64)
    cal, starts = calibration(ids, args.windows, args.every)
    model = TwinLlama(str(gguf), args.device)
    t0 = time.time()
    a = fisher_weights(model, torch.from_numpy(np.asarray(cal)), args.samples, args.seed)
    print(f"fisher weights: {time.time() - t0:.0f} s", flush=True)
    out = {}
    for name, v in a.items():
        v = v.double().cpu().numpy()
        if name.endswith(("attn.wq", "attn.wk")):
            heads = src.args.n_heads if name.endswith("wq") else src.args.n_kv_heads
            v = unpermute(v[:, None], heads)[:, 0]
            if name.startswith("layers.0."):  # the same permutation as the loader's
                tw = unpermute(model.mats[name].w32.cpu().numpy().T, heads).T
                assert np.array_equal(tw.astype(np.float16), src.get(name).astype(np.float16))
        out[name] = (v / v.mean()).astype(np.float32)
    meta = {
        "model": Path(gguf).name,
        "method": "diagonal Fisher of each matrix output, RMS over tokens, mean 1 per matrix",
        "calibration": f"botchan ids, {len(starts)} windows x 256 from {starts[0]} to {starts[-1]}"
        f" ({args.windows} spread over the second half, every {args.every}-th, held-out ones out)",
        "samples": str(args.samples),
        "seed": str(args.seed),
    }
    dst = args.out or profiles.FOLDER / (gguf.stem + out_weights.SUFFIX)
    out_weights.save(out, dst, meta)
    lo = min(float(v.min()) for v in out.values())
    hi = max(float(v.max()) for v in out.values())
    print(f"{len(out)} matrices, a in [{lo:.3g}, {hi:.3g}] -> {dst}")


if __name__ == "__main__":
    main()
