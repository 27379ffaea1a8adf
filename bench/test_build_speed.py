"""Bucket construction time for the largest Mistral-7B matrix shape (run: pytest bench/test_build_speed.py)."""

import numpy as np

import pyeffort


def test_build_4096x14336(benchmark):
    w = np.random.default_rng(0).standard_normal((4096, 14336)).astype(np.float16)
    b = benchmark.pedantic(pyeffort.build_buckets, args=(w,), rounds=3, iterations=1)
    assert b.shape == (4096, 14336)
