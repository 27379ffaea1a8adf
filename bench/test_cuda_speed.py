"""GPU speed of the effort matmul against cuBLAS fp16 (``torch.nn.functional.linear``), one token.
Both run inside CUDA graphs that cycle through enough weight sets (480 MB) that L2 holds none of
them; a benchmark round is one graph replay, reported per call. ``extra_info`` as
bench/test_matmul_speed.py's (shape, kind, effort, gbps, kernel, threads: the multiprocessors),
so ``python bench/report.py`` reads it, with cuBLAS as each shape's baseline. Kinds: cuBLAS,
fp16 buckets (``effort_E``) and q8 buckets (``q8_effort_E``: int8 values, 1.625 bytes per
multiplication against 2.5). Skipped without an NVIDIA GPU. Run on the GPU machine:

    python -m pytest bench/test_cuda_speed.py --benchmark-json=bench/results_cuda.json -q
"""

import functools
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

SHAPES = [(4096, 14336), (14336, 4096)]  # (n_in, n_out)
KINDS = ["cublas_f16", "effort_1.0", "effort_0.5", "effort_0.25"]
KINDS += ["q8_effort_1.0", "q8_effort_0.5", "q8_effort_0.25"]
ROTATE_BYTES = 480e6  # weight bytes cycled per graph: 8x a 60 MB L2
MIN_CALLS = 24  # calls per graph: one replay's launch and sync spread over them


@functools.lru_cache(maxsize=1)
def problem(shape):
    """Weight sets of N(0, 0.02) fp16 weights: their buckets (built on the GPU; fp16 and q8
    values), the nn.Linear layout for cuBLAS, an input and an output each; one shape is kept
    at a time."""
    from pyeffort import cuda

    gen = torch.Generator(device="cuda").manual_seed(0)
    n_in, n_out = shape
    n_sets = max(2, math.ceil(ROTATE_BYTES / (2 * n_in * n_out)))
    sets = []
    for _ in range(n_sets):
        w = (torch.randn(shape, generator=gen, device="cuda") * 0.02).half()
        x = torch.randn(n_in, generator=gen, device="cuda").half()
        y = torch.empty(n_out, dtype=torch.float16, device="cuda")
        bq = cuda.build_buckets(w, values="q8")
        sets.append((cuda.build_buckets(w), w.t().contiguous(), x, y, bq))
    return sets


def graph_of(call, n_calls: int):
    """A CUDA graph of call(0), ..., call(n_calls - 1), warmed up outside the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_calls):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            call(i)
    torch.cuda.synchronize()
    return g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_speed(benchmark, shape, kind):
    import torch.nn.functional as F

    import pyeffort
    from pyeffort import cuda

    sets = problem(shape)
    n_calls = max(len(sets), MIN_CALLS)
    if kind == "cublas_f16":
        effort, nbytes = 1.0, 2 * shape[0] * shape[1]

        def call(i):
            _, wt, x, _, _ = sets[i % len(sets)]
            F.linear(x.view(1, -1), wt)

    else:
        e, q8 = float(kind.split("_")[-1]), kind.startswith("q8_")
        pick = lambda s: (s[4] if q8 else s[0], s[2], s[3])  # (buckets, x, y)
        b, x, y = pick(sets[0])
        _, info = pyeffort.matmul(x, b, e, out=y, return_info=True)
        effort, nbytes = info.effort, info.bytes_read

        def call(i):
            b, x, y = pick(sets[i % len(sets)])
            pyeffort.matmul(x, b, e, out=y)

    g = graph_of(call, n_calls)

    def replay():
        g.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=30, iterations=1, warmup_rounds=3)
    data = benchmark.stats.stats.data  # one replay per round: per call from here on
    data[:] = [t / n_calls for t in data]
    benchmark.extra_info.update(
        shape=f"{shape[0]}x{shape[1]}",
        kind=kind,
        baseline=kind == "cublas_f16",
        effort=effort,
        bytes=int(nbytes),
        gbps=nbytes / benchmark.stats.stats.median / 1e9,
        kernel="cublas" if kind == "cublas_f16" else f"cuda_ct{sets[0][0].ct}",
        threads=cuda.num_sms(sets[0][0].device),
        device=torch.cuda.get_device_name(),
        calls_per_round=n_calls,
    )
