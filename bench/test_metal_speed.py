"""Metal speed on Apple GPUs, for the first person with a Mac (this project has none, so the
table in README.md is empty): the effort matmul (fp16 and q8 buckets at 1.0 / 0.5 / 0.25)
against our dense fp16 kernel (each shape's baseline) and torch's MPS matmul, one token,
4096x14336 and 14336x4096; and the matmuls of one decoding step of the default model in one
command buffer (tokens/s of the matmuls alone: the rest of the model does not run on Metal yet).
A round is one command buffer (``metal.token()``) of many calls cycling through weight sets
too large together for the GPU's caches; times are per call. ``extra_info`` as
bench/test_matmul_speed.py's, so ``python bench/report.py`` reads it. Skipped without Metal:

    python -m pytest bench/test_metal_speed.py --benchmark-json=OUT.json -q
    python bench/report.py OUT.json
"""

import functools
import math

import numpy as np
import pytest

import pyeffort
from pyeffort import metal

pytestmark = pytest.mark.skipif(
    metal.unavailable_reason() is not None, reason=f"no Metal: {metal.unavailable_reason()}"
)

SHAPES = [(4096, 14336), (14336, 4096)]  # (n_in, n_out)
KINDS = ["dense_f16", "mps_f16", "effort_1.0", "effort_0.5", "effort_0.25"]
KINDS += ["q8_effort_1.0", "q8_effort_0.5", "q8_effort_0.25"]
ROTATE_BYTES = 400e6  # weight bytes cycled per round: beyond the system level cache
MIN_CALLS = 16  # calls per round: one commit and wait spread over them


@functools.lru_cache(maxsize=1)
def problem(shape):
    """Weight sets of N(0, 0.02) fp16 weights: (dense, fp16 buckets, q8 buckets, W) on the GPU,
    and one input and output; one shape kept at a time."""
    rng = np.random.default_rng(0)
    n_in, n_out = shape
    sets = []
    for _ in range(max(2, math.ceil(ROTATE_BYTES / (2 * n_in * n_out)))):
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        b16, b8 = pyeffort.build_buckets(w), pyeffort.build_buckets(w, values="q8")
        sets.append((metal.MetalDense(w), b16.to("metal"), b8.to("metal"), w))
    x = metal.MetalArray.wrap(rng.standard_normal(n_in).astype(np.float32))
    return sets, x, metal.empty(n_out)


def per_call(benchmark, fn, n_calls: int) -> bool:
    """Times fn (n_calls calls) per call; False in a smoke run (one call, no timing)."""
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.disabled:
        return False
    data = benchmark.stats.stats.data
    data[:] = [t / n_calls for t in data]
    return True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_metal_speed(benchmark, shape, kind):
    sets, x, y = problem(shape)
    n_calls = max(len(sets), MIN_CALLS)
    effort, nbytes = 1.0, 2 * shape[0] * shape[1]
    if kind == "mps_f16":
        torch = pytest.importorskip("torch")
        if not torch.backends.mps.is_available():
            pytest.skip("torch without MPS")
        ws = [torch.from_numpy(s[3]).to("mps") for s in sets]
        xt = torch.from_numpy(x.numpy()).half().to("mps").view(1, -1)

        def rnd():
            for i in range(n_calls):
                torch.matmul(xt, ws[i % len(ws)])
            torch.mps.synchronize()

    elif kind == "dense_f16":

        def rnd():
            with metal.token():
                for i in range(n_calls):
                    metal.dense_matmul(x, sets[i % len(sets)][0], out=y)

    else:
        e, pick = float(kind.rsplit("_", 1)[1]), 2 if kind.startswith("q8_") else 1
        _, info = metal.matmul(x, sets[0][pick], e, return_info=True)
        effort, nbytes = info.effort, info.bytes_read

        def rnd():
            with metal.token():
                for i in range(n_calls):
                    metal.matmul(x, sets[i % len(sets)][pick], e, out=y)

    if not per_call(benchmark, rnd, n_calls):
        return
    benchmark.group = f"metal {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(
        shape=f"{shape[0]}x{shape[1]}",
        kind=kind,
        baseline=kind == "dense_f16",
        effort=effort,
        bytes=int(nbytes),
        gbps=nbytes / benchmark.stats.stats.median / 1e9,
        kernel="metal",
        device=metal.runtime_line(),
        calls_per_round=n_calls,
    )


@pytest.mark.parametrize("kind", ["dense_f16", "effort_1.0", "effort_0.5", "effort_0.25"])
def test_metal_decode_matmuls(benchmark, kind):
    """Every matrix of the default model once, in one command buffer: a decoding step's
    matmuls (each on a fixed input of its size)."""
    from pyeffort import models

    lins = list(models.load().linears())
    rng = np.random.default_rng(0)
    xs = {n: metal.MetalArray.wrap(rng.standard_normal(n).astype(np.float32)) for n in (576, 1536)}
    ys = {lin.name: metal.empty(lin.shape[1]) for lin in lins}
    if kind == "dense_f16":
        mats = [(lin, metal.MetalDense(np.ascontiguousarray(lin.dense()))) for lin in lins]
        call = lambda lin, m: metal.dense_matmul(xs[lin.shape[0]], m, out=ys[lin.name])
    else:
        e = float(kind.rsplit("_", 1)[1])
        mats = [(lin, lin.buckets.to("metal")) for lin in lins]
        call = lambda lin, m: metal.matmul(xs[lin.shape[0]], m, e, out=ys[lin.name])

    def step():
        with metal.token():
            for lin, m in mats:
                call(lin, m)

    if not per_call(benchmark, step, 1):
        return
    benchmark.group = "metal decode matmuls SmolLM2-135M-Instruct"
    benchmark.extra_info.update(
        kind=kind,
        baseline=kind == "dense_f16",
        tokens_per_s=1 / benchmark.stats.stats.median,
        kernel="metal",
        device=metal.runtime_line(),
    )
