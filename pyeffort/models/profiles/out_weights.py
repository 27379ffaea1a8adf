"""Per-output weights for the output-weighted row statistic, calibrated per model and shipped.

A weights file is a safetensors file (``format=pyeffort``, ``kind=out_weights``, ``version=1``)
holding, for every matrix ``name`` of the model, one F32 tensor ``name`` of shape ``(n_out,)``:
``a_j`` = how much an error in output ``j`` of that matrix costs the model (the root mean square
over calibration tokens of ``d log q(y) / d out_j``, normalised to mean 1 per matrix). The build
ranks each group by ``abs(a_j w_ij)`` and gives each bucket row the RMS of ``a_j w_ij`` (see
``pyeffort.build_buckets``). ``experiments/quality/fisher_weights.py`` makes the shipped file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyeffort import fileformat
from pyeffort.errors import FormatError
from pyeffort.models import profiles

KIND, VERSION = "out_weights", 1
SUFFIX = ".out_weights.safetensors"


def shipped(model_id) -> Path | None:
    """The weights calibrated for a model file (or converted folder) of that name and shipped
    with pyeffort, if any (next to its budget profile)."""
    return profiles.shipped(model_id, SUFFIX)


def save(weights: dict[str, np.ndarray], path, meta: dict[str, str] | None = None) -> None:
    """Write ``{matrix name: (n_out,) weights}`` to ``path`` (float32)."""
    arrays = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in weights.items()}
    specs = [fileformat.TensorSpec(n, a.dtype, a.shape, lambda a=a: a) for n, a in arrays.items()]
    head = {"format": "pyeffort", "kind": KIND, "version": str(VERSION)}
    fileformat.write(path, specs, {**head, **(meta or {})})


def load(path) -> dict[str, np.ndarray]:
    """``{matrix name: (n_out,) float32}`` from a weights file; FormatError if it is not one."""
    r = fileformat.Reader(path)
    m = r.metadata
    if m.get("format") != "pyeffort" or m.get("kind") != KIND or m.get("version") != str(VERSION):
        raise FormatError(f"{path}: not a pyeffort out_weights file (version {VERSION})")
    out = {}
    for name, t in r.tensors.items():
        if t.dtype != np.float32 or len(t.shape) != 1:
            raise FormatError(f"{path}: {name} is {t.dtype}{list(t.shape)}, expected F32 (n_out,)")
        out[name] = r.array(name, copy=True)
    return out


def for_model(model_id, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray] | None:
    """The shipped weights for ``model_id`` if there are some and they fit ``shapes`` (matrix
    name -> (n_in, n_out)) exactly: the same matrices, ``n_out`` weights each; else None."""
    path = shipped(model_id)
    if path is None:
        return None
    w = load(path)
    if set(w) != set(shapes) or any(w[n].shape != (shapes[n][1],) for n in shapes):
        return None
    return w
