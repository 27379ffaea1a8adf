"""Rotary position embedding, Hugging Face "rotate half" layout (the first and second halves of
each head form the pairs; GGUF's interleaved layout is undone by the loader), with the scalings
of ``ModelArgs.rope_scaling`` computed as transformers does (``modeling_rope_utils``).

The one place the tables are made: ``frequencies(args)`` and ``tables(args, start, n)`` give
what any forward pass (numpy here, torch elsewhere) multiplies q and k by."""

from __future__ import annotations

import math

import numpy as np

from pyeffort.models.args import ModelArgs


def frequencies(args: ModelArgs) -> tuple[np.ndarray, float]:
    """-> inv_freq (hd/2,) float64 and the attention factor that scales cos and sin (YaRN's
    mscale; 1 otherwise)."""
    hd, s = args.head_dim, args.rope_scaling
    inv = 1.0 / args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    kind = None if s is None else s["type"]
    if kind is None:
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "freq_factors":
        return inv / np.asarray(s["factors"], np.float64), 1.0
    if kind == "llama3":
        return _llama3(inv, s), 1.0
    if kind == "yarn":
        return _yarn(inv, s, args.rope_theta, hd), s["attention_factor"]
    raise ValueError(f"rope_scaling type {kind!r} has no frequencies here")  # args.py checks it


def _llama3(inv: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth ramp between."""
    ctx, lo, hi, factor = (
        s[k] for k in ("original_context", "low_freq_factor", "high_freq_factor", "factor")
    )
    wavelen = 2 * math.pi / inv
    smooth = (ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > ctx / lo, inv / factor, inv)
    return np.where((wavelen >= ctx / hi) & (wavelen <= ctx / lo), mid, out)


def _yarn(inv: np.ndarray, s: dict, base: float, hd: int) -> np.ndarray:
    """YaRN: interpolated (inv / factor) below the correction range, extrapolated (inv) above
    it, a linear ramp over it (dimensions from beta_fast and beta_slow rotations)."""
    ctx = s["original_context"]

    def dim(rotations: float) -> float:
        return hd * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim(s["beta_fast"]), dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return inv / s["factor"] * ramp + inv * (1 - ramp)


def tables(args: ModelArgs, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, hd/2) float32 of positions start..start+n-1 (the attention factor in both)."""
    inv, scale = frequencies(args)
    ang = np.arange(start, start + n, dtype=np.float64)[:, None] * inv[None, :]  # (n, hd/2)
    return (np.cos(ang) * scale).astype(np.float32), (np.sin(ang) * scale).astype(np.float32)


class Rope:
    """cos/sin tables of a model's RoPE, grown on demand."""

    def __init__(self, args: ModelArgs, n_pos: int = 2048):
        self.args, self.head_dim = args, args.head_dim
        self.cos, self.sin = tables(args, 0, min(n_pos, args.max_seq_len))  # (n_pos, hd/2)

    def _cover(self, end: int) -> None:
        if end > self.cos.shape[0]:
            n = min(max(2 * self.cos.shape[0], end), max(end, self.args.max_seq_len))
            self.cos, self.sin = tables(self.args, 0, n)

    def at(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (hd/2,) float32 of position pos (for ``_backend.current.rope``)."""
        self._cover(pos + 1)
        return self.cos[pos], self.sin[pos]

    def __call__(self, x: np.ndarray, start_pos: int) -> np.ndarray:
        """x (T, heads, hd) at positions start_pos.. -> rotated (T, heads, hd) float32."""
        t = x.shape[0]
        self._cover(start_pos + t)
        c = self.cos[start_pos : start_pos + t, None, :]  # (T, 1, hd/2)
        s = self.sin[start_pos : start_pos + t, None, :]
        h = self.head_dim // 2
        a, b = x[..., :h], x[..., h:]
        out = np.empty_like(x)
        out[..., :h] = a * c - b * s
        out[..., h:] = b * c + a * s
        return out
