"""Device backends without a GPU: dispatch by the ``backend`` attribute, one group limit for
every backend, the CUDA sources found from the package, CUDA statuses mapped as the C core's."""

import pathlib
import re
import shutil
import sys
import types

import numpy as np
import pytest

import pyeffort
from pyeffort import _devices, api, cuda
from pyeffort.errors import BackendError, DTypeError, ShapeError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def header_define(path: str, name: str) -> int:
    m = re.search(rf"#define {name} (\d+)", (ROOT / path).read_text())
    assert m, f"{name} not in {path}"
    return int(m.group(1))


# ---------------------------------------------------------------- one group limit


def test_one_group_limit_on_every_backend():
    """GROUP_MAX is the C core's and the CUDA library's PE_MAX_GROUP, and what the CUDA
    wrapper's call structure holds (it was 3 on CUDA, 4 on the CPU)."""
    assert api.GROUP_MAX == cuda.GROUP_MAX == _devices.GROUP_MAX == 4
    assert header_define("src/cpu/pyeffort.h", "PE_MAX_GROUP") == _devices.GROUP_MAX
    assert header_define("src/cuda/pe_cuda.h", "PE_MAX_GROUP") == _devices.GROUP_MAX
    assert len(cuda._Group().m) == len(cuda._Group().y) == _devices.GROUP_MAX


def test_group_limit_enforced_on_the_cpu(rng):
    B = pyeffort.build_buckets(rng.standard_normal((32, 16)).astype(np.float16))
    x = np.ones(32, dtype=np.float32)
    assert len(pyeffort.matmul_group(x, [B] * _devices.GROUP_MAX, 0.5)) == _devices.GROUP_MAX
    with pytest.raises(ShapeError):
        pyeffort.matmul_group(x, [B] * (_devices.GROUP_MAX + 1), 0.5)


# ---------------------------------------------------------------- dispatch


class _FakeMatrix:
    backend = "fake"
    n_in = 4


@pytest.fixture
def fake_backend(monkeypatch):
    """A device backend "fake" that records its calls."""
    mod = types.ModuleType("pyeffort_fake_backend")
    mod.GROUP_MAX = _devices.GROUP_MAX
    mod.calls = []
    mod.matmul = lambda x, W, e=1.0, *, out=None, return_info=False: mod.calls.append("mm") or 1
    mod.matmul_group = lambda x, Ws, e=1.0, *, return_info=False: mod.calls.append("grp") or 2
    mod.to_device = lambda B, device, **kw: mod.calls.append(("to", device)) or 3
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(_devices.BACKENDS, "fake", mod.__name__)
    return mod


def test_api_dispatches_on_the_backend_attribute(fake_backend, rng):
    x = np.ones(4, dtype=np.float32)
    assert pyeffort.matmul(x, _FakeMatrix(), 0.5) == 1
    assert pyeffort.matmul_group(x, [_FakeMatrix(), _FakeMatrix()], 0.5) == 2
    B = pyeffort.build_buckets(rng.standard_normal((4, 3)).astype(np.float16))
    assert B.to("fake:1") == 3 and B.to("cpu") is B
    assert fake_backend.calls == ["mm", "grp", ("to", "fake:1")]
    with pytest.raises(DTypeError, match="different devices"):
        pyeffort.matmul_group(x, [_FakeMatrix(), B], 0.5)


def test_a_class_name_routes_nothing():
    """A host object whose class is named CudaBuckets is not a CUDA matrix (api.py used to
    compare class names)."""
    CudaBuckets = type("CudaBuckets", (), {})
    with pytest.raises(DTypeError, match="must be a Buckets"):
        pyeffort.matmul(np.ones(4, dtype=np.float32), CudaBuckets(), 0.5)


def test_unknown_devices_and_backends_are_refused(fake_backend, monkeypatch, rng):
    B = pyeffort.build_buckets(rng.standard_normal((4, 3)).astype(np.float16))
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        B.to("gpu")
    monkeypatch.setattr(fake_backend, "GROUP_MAX", _devices.GROUP_MAX - 1)
    with pytest.raises(TypeError, match="does not implement"):
        _devices.get("fake")
    assert isinstance(cuda, _devices.DeviceBackend)


# ---------------------------------------------------------------- the CUDA sources


def _included(src: pathlib.Path) -> set[str]:
    return set(re.findall(r'#include "([^"]+)"', src.read_text()))


def test_cuda_sources_found_in_the_checkout():
    files = {f.name: f for f in cuda.source_files()}
    assert set(cuda.SOURCES) <= set(files)
    for f in files.values():  # every local include is there too
        assert _included(f) <= set(files), f


def test_cuda_sources_found_in_an_installed_package(tmp_path):
    """An installed wheel holds the sources as pyeffort/_cuda_src (setup.py's build_py) and no
    src/ beside the package: cuda.py finds them there."""
    pkg = tmp_path / "site-packages" / "pyeffort"
    shutil.copytree(cuda.source_dir(), pkg / "_cuda_src")
    assert cuda.source_dir(pkg) == pkg / "_cuda_src"
    assert [f.name for f in cuda.source_files(pkg)] == [f.name for f in cuda.source_files()]
    (pkg / "_cuda_src" / "bucketmul.cu").unlink()
    with pytest.raises(BackendError, match="kernel sources"):
        cuda.source_dir(pkg)


def test_setup_ships_what_cuda_compiles():
    """setup.py compiles (PYEFFORT_CUDA=1) and packages the translation units cuda.py does."""
    setup = (ROOT / "setup.py").read_text()
    units = re.search(r"CUDA_UNITS = \(([^)]*)\)", setup).group(1)
    assert tuple(re.findall(r'"([^"]+)"', units)) == cuda.SOURCES


# ---------------------------------------------------------------- statuses


class _FakeLib:
    @staticmethod
    def pe_cuda_error_string(status):
        return b"an illegal memory access was encountered" if status > 1000 else None


@pytest.mark.parametrize(
    "status,exc,text",
    [
        (1, MemoryError, "out of memory"),
        (3, ShapeError, "inconsistent sizes"),
        (1000 + 700, BackendError, "illegal memory access"),
    ],
)
def test_cuda_statuses_raise_as_the_c_core(status, exc, text):
    """The CUDA library's statuses (pe_cuda.h: the C core's codes, 1000 + a CUDA error) go
    through errors.status_error."""
    with pytest.raises(exc, match=text):
        cuda._check(_FakeLib, status)
    cuda._check(_FakeLib, 0)
    assert header_define("src/cuda/pe_cuda.h", "PE_CUDA_ERR_ARG") == 3
    assert header_define("src/cuda/pe_cuda.h", "PE_CUDA_ERR_DEVICE") == 1000
