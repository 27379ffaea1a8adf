"""Rotary position embedding, Hugging Face "rotate half" layout (the first and second halves of
each head form the pairs; GGUF's interleaved layout is undone by the loader)."""

from __future__ import annotations

import numpy as np


class Rope:
    """cos/sin tables for head size ``head_dim``, grown on demand."""

    def __init__(self, head_dim: int, theta: float, n_pos: int = 2048):
        self.head_dim, self.theta = head_dim, float(theta)
        self.inv_freq = 1.0 / (
            self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        )
        self._build(n_pos)

    def _build(self, n_pos: int) -> None:
        ang = np.arange(n_pos, dtype=np.float64)[:, None] * self.inv_freq[None, :]  # (n_pos, hd/2)
        self.cos = np.cos(ang).astype(np.float32)  # (n_pos, hd/2)
        self.sin = np.sin(ang).astype(np.float32)  # (n_pos, hd/2)

    def _cover(self, end: int) -> None:
        if end > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], end))

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
