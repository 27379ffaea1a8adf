"""What the torch-twin probes of experiments/README.md's fifth round share (``quality_dyn``,
``quality_oracle_twin``, ``quality_outw``, ``quality_pool``, ``quality_sink``): the command
line, the model and the windows on the GPU, one KL pass with a chosen product per matrix, and
the rows printed as they come and written as JSON."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch_search as S
from torch_twin import TwinLlama, kl_per_token

from pyeffort.models.profiles import out_weights


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True, help="Botchan's token ids (.npy)")
    p.add_argument("--out-weights", default=None, help="per-output weights (.safetensors)")
    p.add_argument("--efforts", default="0.25,0.5")
    p.add_argument("--length", type=int, default=256, help="tokens per window (smoke runs: 16)")
    p.add_argument("--out", required=True, help="JSON rows")
    return p


def setup(args, weighted: bool = True, which=("cal", "hold", "eval")):
    """(model, bench): the twin built with ``--out-weights`` when ``weighted``, on the GPU when
    there is one, and its exact log-probabilities on the split's windows ``which``."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ow = out_weights.load(args.out_weights) if weighted and args.out_weights else None
    model = TwinLlama(args.gguf, dev, ow)
    sets, _, _ = S.windows(np.load(args.ids), 24, 4, args.length)
    return model, S.Bench(model, {k: sets[k] for k in which})


def efforts(args) -> list[float]:
    return [float(v) for v in args.efforts.split(",")]


def plain(name, mat, x, effort):
    """The default rule: the twin matrix itself."""
    return mat(x, effort)


def kl_pass(model, bench, eff: dict, product=plain, which=("cal", "hold", "eval")):
    """Per set, the KL per position (B, T) and the realised effort, with every matrix through
    ``product(name, matrix, x, effort) -> (y, multiplications)`` at ``eff[name]`` (missing:
    1.0)."""
    kls, realised = {}, {}
    for k in which:
        acc = [0.0, 0]

        def hook(name, mat, x, acc=acc):
            y, mults = product(name, mat, x, eff.get(name, 1.0))
            acc[0] += float(mults)
            acc[1] += x.shape[0] * mat.size
            return y

        kls[k] = kl_per_token(bench.exact[k], model.forward(bench.sets[k], hook))
        realised[k] = acc[0] / acc[1]
    return kls, realised


class Rows:
    """Result rows: each printed with the time since the start, all written to ``path``."""

    def __init__(self, path: str):
        self.path, self.rows, self.t0 = path, [], time.time()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(f"[{time.time() - self.t0:5.0f}s] {json.dumps(row)}", flush=True)

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.rows, f, indent=1)
