"""What the benchmark suites share. Each benchmark names its group (its shape, or its model):
``bench/report.py`` compares each row with the dense baseline of its own group only.

``--benchmark-disable`` is the smoke run: every benchmark once, and only on the smallest of
its module's ``SHAPES``: ``python -m pytest bench -q --benchmark-disable`` (seconds).
"""

from __future__ import annotations

import pytest


def is_smoke(config) -> bool:
    return bool(
        config.getoption("benchmark_disable", False)
        and not config.getoption("benchmark_enable", False)
    )


def shape_id(shape) -> str:
    return "x".join(str(n) for n in shape)


def pytest_generate_tests(metafunc):
    """A test with a ``shape`` argument (not parametrised by hand) runs on its module's
    ``SHAPES``; in a smoke run on the smallest of them alone."""
    shapes = getattr(metafunc.module, "SHAPES", None)
    if "shape" not in metafunc.fixturenames or shapes is None:
        return
    if any("shape" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return
    if is_smoke(metafunc.config):
        shapes = [min(shapes, key=lambda s: s[0] * s[1])]
    metafunc.parametrize("shape", shapes, ids=shape_id)


@pytest.fixture
def smoke(request) -> bool:
    """True in a smoke run (``--benchmark-disable``): one call, no timing."""
    return is_smoke(request.config)


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=, kind=, rounds=, baseline=False, rates={}, **info) -> median
    seconds`` (None in a smoke run, where ``fn`` runs once): ``fn`` timed by
    ``benchmark.pedantic`` in ``group``, with ``kind``, ``baseline`` (the dense row that the
    group's ratios divide by), ``info`` and, per ``rates`` entry ``name: amount per call``,
    ``name = amount / median`` in ``extra_info``."""

    def run(fn, *, group, kind, rounds, baseline=False, warmup=3, rates=None, **info):
        benchmark.group = group
        benchmark.extra_info.update(kind=kind, baseline=baseline, **info)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
        if benchmark.disabled:
            return None
        median = benchmark.stats.stats.median
        benchmark.extra_info.update({k: v / median for k, v in (rates or {}).items()})
        return median

    return run
