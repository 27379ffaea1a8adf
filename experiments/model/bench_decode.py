"""Decode tokens/s of the default model (SmolLM2-135M-Instruct): pyeffort at several efforts next
to transformers' ``generate()`` on torch CPU (fp32, batch 1, the same GGUF), in one run,
interleaved, at the same thread count.

    python experiments/model/bench_decode.py --threads 1,2 --tokens 64 --repeats 3

Tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)): prefill excluded the same way for both.
Greedy decoding; the median over repeats is reported; each repeat starts the efforts at the next
one (1.0, 0.5, 0.25, then 0.5, 0.25, 1.0, ...), so no effort always runs right after
transformers. Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--efforts", default="1.0,0.5,0.25")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="The history of the city began")
    a = ap.parse_args()

    import torch
    import transformers

    import pyeffort
    from pyeffort import models
    from pyeffort.models.default import default_gguf
    from pyeffort.models.generate import generate

    transformers.logging.set_verbosity_error()
    gguf = default_gguf()
    ours = models.load(progress=True)
    ids = ours.tokenizer.encode(a.prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])
    efforts = [float(e) for e in a.efforts.split(",")]
    n = a.tokens
    mats = sum(lin.buckets.nbytes for lin in ours.linears())

    def hf_gen(k):
        with torch.no_grad():
            hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    def our_gen(k, e):
        list(generate(ours, ids, max_tokens=k, effort=e, stop=[]))

    def dense_gen(k):  # our model code with every matrix on the dense fp16 kernel
        for lin in ours.linears():
            lin.hook = lambda lin, x, e: pyeffort.dense_matmul(x, lin.dense())
        try:
            our_gen(k, 1.0)
        finally:
            for lin in ours.linears():
                lin.hook = None

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; pyeffort kernel "
          f"{pyeffort.runtime_info()['kernel']}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip
    print(f"prompt {len(ids)} tokens, {n} new tokens, median of {a.repeats}\n")
    print("| threads | transformers tok/s | " + " | ".join(f"pyeffort {e:g} tok/s" for e in efforts)
          + " | realised | speed-up vs transformers at " + "/".join(f"{e:g}" for e in efforts)
          + " | same model code, dense fp16 kernel tok/s |")  # fmt: skip
    print("|---" * (4 + len(efforts)) + "|---|")
    for th in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(th)
        pyeffort.set_num_threads(th)
        hf_gen(2)
        our_gen(2, 1.0)
        dense_gen(2)
        res = {"hf": [], "dense": []} | {e: [] for e in efforts}
        real = {}
        for r in range(a.repeats):
            res["hf"].append((n - 1) / (timed(lambda: hf_gen(n)) - timed(lambda: hf_gen(1))))
            for e in efforts[r % len(efforts) :] + efforts[: r % len(efforts)]:  # rotated
                t1 = timed(lambda e=e: our_gen(1, e))
                ours.reset_counters()
                tn = timed(lambda e=e: our_gen(n, e))
                real[e] = ours.realised_effort()
                res[e].append((n - 1) / (tn - t1))
            res["dense"].append(
                (n - 1) / (timed(lambda: dense_gen(n)) - timed(lambda: dense_gen(1)))
            )
        med = {k: statistics.median(v) for k, v in res.items()}
        cols = " | ".join(f"{med[e]:.1f}" for e in efforts)
        reals = "/".join(f"{real[e]:.3f}" for e in efforts)
        ups = "/".join(f"{med[e] / med['hf']:.2f}x" for e in efforts)
        print(f"| {th} | {med['hf']:.1f} | {cols} | {reals} | {ups} | {med['dense']:.1f} |",
              flush=True)  # fmt: skip
    mb = mats / 2**20
    print(f"\n(bucket matrices {mb:.0f} MiB, read in proportion to the effort; "
          f"LM head dense fp16 {ours.lm_head.nbytes / 2**20:.0f} MiB; "
          f"{np.__name__} {np.__version__})")  # fmt: skip


if __name__ == "__main__":
    main()
