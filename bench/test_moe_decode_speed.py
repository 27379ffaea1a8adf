"""Decode speed of a Mixtral-shaped random model (8 experts, top-2, GQA) scaled to a small
machine: one decoding step at efforts 1.0 / 0.5 / 0.25 next to the same model code with every
matrix on our dense fp16 product (the group's baseline; the same routing: only the routed
experts are multiplied on either path). ``extra_info``: tokens/s, realised effort (over the
routed experts' and the attention matrices' multiplications), ``bytes_per_token`` (weight
bytes the matrices read: ``MatmulInfo.bytes_read``, or 2 per weight on the dense path; the
float32 router and the LM head, the same on both paths, are left out) and GB/s.

    python -m pytest bench/test_moe_decode_speed.py --benchmark-json=OUT.json -q
"""

import functools
import itertools

import numpy as np
import pytest

import pyeffort
from pyeffort import _core
from pyeffort.models import Model, ModelArgs

EFFORTS = [1.0, 0.5, 0.25]
SHAPES = [(1024, 3584), (64, 128)]  # (dim, hidden_dim): Mixtral-8x7B / 4; the smoke run's
N_LAYERS, N_EXPERTS, TOP_K, PROMPT = 4, 8, 2, 16


@functools.lru_cache(maxsize=1)
def random_mixtral(shape, n_layers: int = N_LAYERS) -> Model:
    """A Mixtral-shaped Model with random weights (W ~ N(0, 1/n_in), float16 buckets)."""
    dim, hidden = shape
    a = ModelArgs(dim=dim, n_layers=n_layers, n_heads=max(2, dim // 128),
                  n_kv_heads=max(1, dim // 512), hidden_dim=hidden, vocab_size=1024,
                  max_seq_len=256, architecture="mixtral", n_experts=N_EXPERTS,
                  n_experts_per_tok=TOP_K)  # fmt: skip
    from pyeffort.models.args import tensor_shape
    from pyeffort.models.loaders import matrix_names, plain_names

    rng = np.random.default_rng(0)
    w = {}
    for n in plain_names(a):
        shp = tensor_shape(a, n)
        dtype = np.float16 if n in ("embed", "lm_head") else np.float32
        w[n] = (rng.standard_normal(shp) / np.sqrt(shp[0] if len(shp) == 2 else 1)).astype(dtype)
    for n in matrix_names(a):
        n_in, n_out = tensor_shape(a, n)
        m = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float16)
        w[n] = pyeffort.build_buckets(m)
    model = Model(a, w)
    for lin in model.linears():  # what a first use would build, not timed: kernel copies
        pyeffort.prepare(lin.buckets)
        lin.dense()
    return model


def dense(lin, x, effort):
    return pyeffort.dense_matmul(x, lin.dense())


def bytes_read(model, step, dense_path: bool) -> int:
    """The matrices' weight bytes of one ``step()``: summed ``MatmulInfo.bytes_read`` of its
    effort products, or 2 per weight of every matrix it multiplied densely."""
    model.reset_counters()
    if dense_path:
        lins = list(model.linears())
        seen = []
        for lin in lins:
            lin.hook = lambda lin, x, e: (seen.append(lin), dense(lin, x, e))[1]
        try:
            step()
        finally:
            for lin in lins:
                lin.hook = None
        return sum(2 * lin.shape[0] * lin.shape[1] for lin in seen)
    total = []
    group, one = pyeffort.matmul_group, pyeffort.matmul

    def spy_group(*a, **k):
        ys, infos = group(*a, **k)
        total.extend(i.bytes_read for i in infos)
        return ys, infos

    def spy_one(*a, **k):
        y, info = one(*a, **k)
        total.append(info.bytes_read)
        return y, info

    pyeffort.matmul_group, pyeffort.matmul = spy_group, spy_one
    try:
        step()
    finally:
        pyeffort.matmul_group, pyeffort.matmul = group, one
    return sum(total)


@pytest.mark.parametrize("kind", ["dense_f16"] + [f"effort_{e}" for e in EFFORTS])
def test_moe_decode_speed(measure, shape, kind):
    model = random_mixtral(shape)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.args.vocab_size, PROMPT)
    effort = 1.0 if kind == "dense_f16" else float(kind.split("_")[1])
    model.reset()
    model.forward(ids, 0, 1.0)  # the prompt in the cache
    tokens = itertools.cycle(rng.integers(0, model.args.vocab_size, 64).tolist())

    def step():  # one token at position PROMPT: a new token each time, so other experts
        model.forward([next(tokens)], PROMPT, effort, last_only=True)

    nbytes = np.mean([bytes_read(model, step, kind == "dense_f16") for _ in range(8)])
    lins = list(model.linears())
    for lin in lins:
        lin.hook = dense if kind == "dense_f16" else None
    model.reset_counters()
    try:
        measure(step, group=f"decode Mixtral-shaped {shape[0]}x{shape[1]}", kind=kind, rounds=20,
                baseline=kind == "dense_f16", effort=effort, kernel=_core.kernel_name(),
                threads=_core.num_threads(), bytes_per_token=float(nbytes),
                rates={"tokens_per_s": 1, "gbps": nbytes / 1e9})  # fmt: skip
    finally:
        for lin in lins:
            lin.hook = None
    if kind != "dense_f16":
        assert abs(model.realised_effort() - effort) < 0.02
