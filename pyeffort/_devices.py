"""Device backends: what one must provide, the limits every backend shares, and the registry
that ``api.py`` and ``Buckets.to`` dispatch through.

A device backend is a module (``pyeffort.cuda``) implementing ``DeviceBackend``; its matrices
carry the backend's name in a ``backend`` attribute. The host path (``Buckets``, numpy arrays)
has none and stays in ``api.py``. Backends are imported at their first use (torch is optional),
and they import only leaf modules (this one, ``errors``, ``reference``, ``_validate``): the
module graph has no cycle (tests/test_imports.py).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Protocol, runtime_checkable

GROUP_MAX = 4  # matrices per matmul_group call, on every backend (PE_MAX_GROUP in C and CUDA)
BACKENDS = {"cuda": "pyeffort.cuda", "metal": "pyeffort.metal"}  # device type -> its module


class MatmulInfo(NamedTuple):
    """What a call did: realised effort (fraction of the n_in * n_out multiplications performed,
    averaged over tokens), the weight bytes read, and the multiplications performed."""

    effort: float
    bytes_read: int
    mults: int


@runtime_checkable
class DeviceBackend(Protocol):
    """The functions ``api.py`` and ``Buckets.to`` call on a device backend."""

    GROUP_MAX: int

    def matmul(self, x, W, effort=1.0, *, out=None, return_info=False): ...

    def matmul_group(self, x, Ws, effort=1.0, *, return_info=False): ...

    def to_device(self, B, device, **kw): ...


def get(name: str) -> DeviceBackend:
    """The backend of device type ``name`` ("cuda", "metal"), imported on first use."""
    if name not in BACKENDS:
        raise ValueError(f"unknown device {name!r}: expected 'cpu' or one of {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    if not isinstance(module, DeviceBackend) or module.GROUP_MAX != GROUP_MAX:
        raise TypeError(f"{BACKENDS[name]} does not implement pyeffort's DeviceBackend")
    return module


def backend_of(obj) -> DeviceBackend | None:
    """The backend a matrix (or group of matrices) lives on, or None for the host."""
    name = getattr(obj, "backend", None)
    return None if name is None else get(name)


def on_device(a) -> bool:
    """Whether ``a`` is an array in device memory (a torch CUDA tensor) that the host path
    cannot read."""
    return getattr(a, "is_cuda", False) is True
