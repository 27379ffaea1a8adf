import zlib

import numpy as np
import pytest

from pyeffort import _backend


@pytest.fixture(params=list(_backend.NAMES))
def backend(request):
    """Runs a test once per implementation: the compiled core and the numpy reference."""
    previous = _backend.use(request.param)
    yield request.param
    _backend.current = previous


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
