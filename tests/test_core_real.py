"""The semantics on real weights with real activations: the default model run by the peer."""

import pathlib
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort import reference

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments" / "quality"))
import realdata


@pytest.fixture(scope="module")
def mats():
    try:
        return realdata.capture(n_tokens=24)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_cosine_at_quarter_effort_is_near_the_oracle(mats):
    table = realdata.cosine_table(mats, [0.25], tokens=[7, 23])
    ours, oracle = table[0.25]
    assert len(mats) == 210
    assert ours >= oracle - 0.01, (ours, oracle)


def test_realised_effort_on_real_weights(backend, mats):
    for name, w, xs in mats[:7]:  # one layer: every matrix shape of the model
        b = pyeffort.build_buckets(w)
        for e in [0.05, 0.1, 0.25, 0.5, 0.8, 1.0]:
            y, info = pyeffort.matmul(xs[5], b, e, return_info=True)
            assert abs(info.effort - e) <= 0.01, (name, e, info.effort)
            ref = np.empty_like(y)
            reference.bucketmul(
                xs[5:6], b.values, b.positions, b.stats, b.order, b.n_out, e, ref[None]
            )
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_full_effort_error_on_real_weights(mats):
    for _, w, xs in mats[::30]:
        w16 = w.astype(np.float16)
        exact = xs[3].astype(np.float64) @ w16.astype(np.float64)
        y = pyeffort.matmul(xs[3], pyeffort.build_buckets(w16), 1.0)
        assert np.linalg.norm(y - exact) / np.linalg.norm(exact) <= 2e-3
