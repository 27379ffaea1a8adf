"""One shape's effort matmul called eagerly, for Nsight Compute (ncu) to read counters of one
call: python experiments/cuda/cuda_ncu.py 4096x4096 0.25 [n_calls]. Rotates weight sets as the benchmark
does (so L2 does not hold the weights); ncu picks the call with -s/-c."""

import sys

import torch

import pyeffort
from pyeffort import cuda

n_in, n_out = (int(v) for v in sys.argv[1].split("x"))
effort = float(sys.argv[2])
n_calls = int(sys.argv[3]) if len(sys.argv) > 3 else 12
gen = torch.Generator(device="cuda")
gen.manual_seed(0)
n_sets = max(2, -(-480_000_000 // (2 * n_in * n_out)))
bs, xs = [], []
for _ in range(n_sets):
    w = (torch.randn((n_in, n_out), generator=gen, device="cuda") * 0.02).half()
    bs.append(cuda.build_buckets(w))
    xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
    del w
y = torch.empty(n_out, dtype=torch.float16, device="cuda")
for i in range(n_calls):
    pyeffort.matmul(xs[i % n_sets], bs[i % n_sets], effort, out=y)
torch.cuda.synchronize()
print("done", n_sets, "sets")
