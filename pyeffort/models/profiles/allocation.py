"""Splitting the user's effort between matrices: matrix m gets ``effort_m = min(1, lam * w_m(e)
* e)`` with ``lam`` chosen so that the multiplications add up to the user's effort,
``sum(effort_m * size_m) == e * sum(size_m)``. ``w_m`` are weights calibrated on other text.

A profile is a dict ``{"efforts": [e0, e1, ...], "weights": {name: [w(e0), w(e1), ...]}}``;
weights between grid efforts are interpolated in log space; a name missing from the profile
falls back to its matrix type (the part after the layer number, e.g. ``attn.wv``) or 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pyeffort.models import profiles


def matrix_type(name: str) -> str:
    """``layers.3.attn.wq`` -> ``attn.wq``; names without a layer number are returned whole."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1 :])
    return name


def normalise(weights: np.ndarray, sizes: np.ndarray, effort: float) -> np.ndarray:
    """Per-matrix efforts min(1, lam * w * effort) whose size-weighted mean is ``effort``."""
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    if effort <= 0:
        return np.zeros_like(w)
    if effort >= 1:
        return np.ones_like(w)
    target = effort * s.sum()

    def total(lam):
        return (np.minimum(1.0, lam * w * effort) * s).sum()

    lo, hi = 0.0, 1.0
    while total(hi) < target:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return np.minimum(1.0, hi * w * effort)


class Allocation:
    """Per-matrix efforts from a profile (or uniform when ``profile`` is None)."""

    def __init__(self, names: list[str], sizes: list[int], profile: dict | None = None):
        self.names = list(names)
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.profile = profile
        self._cache: dict[float, dict[str, float]] = {}

    def weights(self, effort: float) -> np.ndarray:
        if self.profile is None:
            return np.ones(len(self.names))
        grid = np.asarray(self.profile["efforts"], dtype=np.float64)
        table = self.profile["weights"]
        strength = float(self.profile.get("strength", 1.0))  # 0 = uniform, 1 = the full split
        out = np.ones(len(self.names))
        for k, n in enumerate(self.names):
            row = table.get(n, table.get(matrix_type(n)))
            if row is not None:
                logw = np.log(np.maximum(np.asarray(row, dtype=np.float64), 1e-6))
                out[k] = math.exp(strength * np.interp(effort, grid, logw))
        return out

    def efforts(self, effort: float) -> dict[str, float]:
        """name -> effort of that matrix, adding up to ``effort`` over all the matrices."""
        key = round(float(effort), 9)
        if key not in self._cache:
            e = normalise(self.weights(effort), self.sizes, effort)
            self._cache[key] = dict(zip(self.names, e.tolist()))
        return self._cache[key]


def shipped(model_id) -> Path | None:
    """The profile calibrated for a model file (or converted folder) of that name and shipped
    with pyeffort, if any."""
    return profiles.shipped(model_id, ".json")


def save(profile: dict, path) -> None:
    """Write ``profile`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(profile, indent=1))
    part.replace(path)


def load(path) -> dict:
    p = json.loads(Path(path).read_text())
    if "efforts" not in p or "weights" not in p:
        raise ValueError(f"{path}: not an allocation profile (needs 'efforts' and 'weights')")
    return p
