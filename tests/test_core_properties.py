"""Hypothesis property tests: the compiled core against the numpy reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pyeffort
from pyeffort import _core, reference


@st.composite
def problems(draw):
    n_in = draw(st.integers(1, 70))
    n_out = draw(st.integers(1, 90))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-4, 0.02, 1.0, 300.0]))
    w = (rng.standard_normal((n_in, n_out)) * scale).astype(np.float16)
    if draw(st.booleans()):  # ties and zeros
        w[rng.random(w.shape) < 0.3] = 0
        w[:, ::3] = w[:, :1]
    x = rng.standard_normal((draw(st.integers(1, 3)), n_in)).astype(np.float32)
    if draw(st.booleans()):
        x[:, rng.random(n_in) < 0.4] = 0
    effort = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)))
    fraction = draw(st.sampled_from([1.0, 1.0, 0.5, 0.13]))
    return w, x, effort, fraction


@settings(max_examples=150, deadline=None)
@given(problems())
def test_c_core_matches_reference(problem):
    w, x, effort, fraction = problem
    c_build, r_build = _core.build(w), reference.build(w)
    for a, b in zip(c_build, r_build):
        np.testing.assert_array_equal(a, b)
    values, positions, stats, order = c_build
    n_rows = pyeffort.buckets.rows_for_fraction(w.shape[0], w.shape[1], fraction)
    values, positions = values[:n_rows], positions[:n_rows]
    y_c = np.empty((x.shape[0], w.shape[1]), dtype=np.float32)
    y_r = np.empty_like(y_c)
    got = _core.bucketmul(x, values, positions, stats, order, w.shape[1], effort, y_c)
    want = reference.bucketmul(x, values, positions, stats, order, w.shape[1], effort, y_r)
    assert got == want  # the same rows were selected: same multiplications and bytes
    tol = 1e-5 * (np.abs(x).max() * np.abs(w.astype(np.float32)).sum(0).max() + 1e-30)
    np.testing.assert_allclose(y_c, y_r, rtol=1e-5, atol=tol)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_realised_effort_never_below_request_unless_capped(problem):
    w, x, effort, _ = problem
    b = pyeffort.build_buckets(w)
    _, info = pyeffort.matmul(x, b, effort, return_info=True)
    if effort == 0:
        assert info.mults == 0
    else:
        # the cutoff takes whole rows until the budget is met: never less than asked
        assert info.effort >= effort - 1e-12
