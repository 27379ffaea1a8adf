"""Picks the implementation behind the API: the compiled core, or the numpy reference.

``PYEFFORT_BACKEND=numpy`` forces the reference (as msgpack's pure-Python fallback); the test
suite runs once per backend through ``use()``.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from pyeffort import reference

NAMES = ("c", "numpy")


def _load(name: str) -> ModuleType:
    if name == "numpy":
        return reference
    if name == "c":
        from pyeffort import _core

        return _core
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


def _initial() -> ModuleType:
    name = os.environ.get("PYEFFORT_BACKEND", "c")
    try:
        return _load(name)
    except ImportError as exc:  # a source checkout that was never built
        warnings.warn(f"pyeffort: compiled core unavailable ({exc}); using the numpy reference")
        return reference


current: ModuleType = _initial()


def use(name: str) -> ModuleType:
    """Switch the backend for the whole process; returns the previous one."""
    global current
    previous, current = current, _load(name)
    return previous
