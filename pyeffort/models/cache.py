"""The KV cache: keys and values of every layer for the positions seen so far."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Per layer: k, v (n_kv_heads, capacity, head_dim) float32; grows by doubling.

    Writing at ``start_pos`` overwrites from there, so ``forward(tokens, 0, ...)`` starts afresh.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int = 256):
        self.shape = (n_kv_heads, capacity, head_dim)
        self.k = [np.zeros(self.shape, np.float32) for _ in range(n_layers)]
        self.v = [np.zeros(self.shape, np.float32) for _ in range(n_layers)]
        self.length = 0  # positions filled (the same for every layer after a forward)

    @property
    def capacity(self) -> int:
        return self.shape[1]

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray):
        """Store k, v (T, n_kv, hd) at start_pos..; -> views k, v (n_kv, start_pos+T, hd)."""
        end = start_pos + k.shape[0]
        if start_pos > self.length and layer == 0:
            raise ValueError(f"start_pos {start_pos} skips positions (cache holds {self.length})")
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, start_pos:end] = k.transpose(1, 0, 2)
        self.v[layer][:, start_pos:end] = v.transpose(1, 0, 2)
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def put(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """One decoding step's k, v (n_kv, hd) at position pos: ``update`` for one token,
        without making views."""
        if pos >= self.capacity or (pos > self.length and layer == 0):
            self.update(layer, pos, k[None], v[None])  # grows, or raises
            return
        self.k[layer][:, pos] = k
        self.v[layer][:, pos] = v
        if layer == len(self.k) - 1:
            self.length = pos + 1

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        n_kv, old, hd = self.shape
        for buf in (self.k, self.v):
            for i, a in enumerate(buf):
                b = np.zeros((n_kv, cap, hd), np.float32)
                b[:, :old] = a
                buf[i] = b
        self.shape = (n_kv, cap, hd)
