"""Bucket construction time (``pyeffort.build_buckets``), one benchmark group per shape: the
largest Mistral-7B matrix and the default model's largest. ``extra_info``: weights per second.

    python -m pytest bench/test_build_speed.py --benchmark-json=OUT.json -q
"""

import numpy as np

import pyeffort

SHAPES = [(4096, 14336), (576, 1536)]


def test_build_speed(measure, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    out = []
    measure(
        lambda: out.append(pyeffort.build_buckets(w)),
        group=f"build {shape[0]}x{shape[1]}",
        kind="build_f16",
        rounds=3,
        warmup=0,
        shape=f"{shape[0]}x{shape[1]}",
        rates={"weights_per_s": w.size},
    )
    assert out[-1].shape == shape
