"""pyeffort.torch.EffortLinear in a plain nn.Module: accuracy and time per token at several
efforts against the nn.Linear it replaces (torch CPU).

    python examples/effort_linear.py [--n-in 4096] [--n-out 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

import pyeffort.torch as pet


def per_token_ms(f, x, reps: int = 50) -> float:
    f(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-in", type=int, default=4096)
    ap.add_argument("--n-out", type=int, default=4096)
    a = ap.parse_args()
    torch.manual_seed(0)
    dense = torch.nn.Linear(a.n_in, a.n_out)
    lin = pet.EffortLinear.from_linear(dense)  # bucketed once
    print(lin)
    x = torch.randn(1, a.n_in)
    with torch.inference_mode():
        exact = dense(x)
        print(f"nn.Linear: {per_token_ms(dense, x):.3f} ms/token")
        for e in (1.0, 0.5, 0.25):
            lin.effort = e
            lin.reset_counters()
            y = lin(x)
            cos = torch.nn.functional.cosine_similarity(y, exact).item()
            ms = per_token_ms(lin, x)
            print(f"effort {e:4}: realised {lin.realised_effort:.3f}, cosine {cos:.4f}, "
                  f"{ms:.3f} ms/token")  # fmt: skip


if __name__ == "__main__":
    main()
