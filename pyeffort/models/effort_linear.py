"""EffortLinear: one weight matrix of the model, multiplied through ``pyeffort.matmul``.

Interface (stable; the quality harness relies on it):
- ``name``: ``"layers.{i}.attn.wq"`` / ``wk`` / ``wv`` / ``wo``, ``"layers.{i}.ffn.w1"`` (gate),
  ``w3`` (up), ``w2`` (down);
- ``buckets``: the ``pyeffort.Buckets`` of W (n_in, n_out);
- ``__call__(x, effort) -> y``: x (n_in,) or (T, n_in) float32 -> (n_out,) or (T, n_out) float32;
- ``hook`` (default None): when set, ``__call__`` returns ``hook(self, x, effort)`` instead;
- ``dense()``: W as float16 (n_in, n_out) (the exact reference), built once from the buckets;
- ``split`` (default None): when set, ``effort -> this matrix's effort`` under a budget profile
  (``Model.set_profile``): the model's total multiplications stay the asked fraction;
- ``mults`` / ``total``: multiplications done / of a dense product since ``reset_counters()``;
- ``prefetch()``: starts reading the matrix's copy into the caches (decoding, the next matrix).

Decode (one token) always runs ``pyeffort.matmul`` at the given effort. A batch of tokens at
effort 1.0 (the prefill) runs ``pyeffort.dense_matmul`` on ``dense()`` when ``prefill_dense``.
"""

from __future__ import annotations

import numpy as np

import pyeffort

PREFILL_DENSE_MIN_TOKENS = 2  # at effort 1.0 a batch of >= this many tokens runs dense_matmul


class EffortLinear:
    def __init__(self, name: str, buckets: pyeffort.Buckets):
        self.name = name
        self.buckets = buckets
        self.hook = None
        self.split = None  # effort -> this matrix's effort (Model.set_profile)
        self.w16 = None  # (n_in, n_out) float16 dense copy, made on first need
        self.prefill_dense = True  # False: prefill at 1.0 through pyeffort.matmul (no copy)
        self.mults = 0  # multiplications done by pyeffort.matmul since reset_counters()
        self.total = 0  # multiplications a dense product would have done
        self._loaded = round(buckets.loaded_fraction * buckets.n_in * buckets.n_out)

    @property
    def shape(self) -> tuple[int, int]:
        return self.buckets.shape

    def dense(self) -> np.ndarray:
        """W (n_in, n_out) float16; rows dropped by a partial load are zero."""
        if self.w16 is None:
            self.w16 = np.ascontiguousarray(self.buckets.to_dense())
        return self.w16

    def reset_counters(self) -> None:
        self.mults = self.total = 0

    def __call__(self, x: np.ndarray, effort: float) -> np.ndarray:
        if self.hook is not None:
            return self.hook(self, x, effort)
        effort = self.own_effort(effort)
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_tok = 1 if x.ndim == 1 else x.shape[0]
        n = self.buckets.n_in * self.buckets.n_out
        if effort >= 1.0 and n_tok >= PREFILL_DENSE_MIN_TOKENS and self.prefill_dense:
            # prefill: the dense fp16 kernel is ~10x faster per token than the bucket kernel
            # at full effort (and numpy's BLAS threads would fight pyeffort's thread pool)
            self.mults += n_tok * self._loaded
            self.total += n_tok * n
            return pyeffort.dense_matmul(x, self.dense())
        y, info = pyeffort.matmul(x, self.buckets, effort, return_info=True)
        self.count(info, n_tok)
        return y

    def prefetch(self) -> None:
        """Starts an idle pool thread reading this matrix's statistics and copy
        (``pyeffort.prefetch``): the model calls it for the next matrix of a decoding step
        before the work in between."""
        prefetch_group([self])

    def own_effort(self, effort: float) -> float:
        """This matrix's effort when the model asks ``effort`` (its budget split, if any)."""
        return self.split(effort) if self.split is not None and effort < 1.0 else effort

    def count(self, info: pyeffort.MatmulInfo, n_tok: int) -> None:
        """Adds a ``pyeffort.matmul`` call of n_tok tokens to ``mults`` / ``total``."""
        self.mults += info.mults
        self.total += n_tok * self.buckets.n_in * self.buckets.n_out

    def __repr__(self) -> str:
        return f"EffortLinear({self.name!r}, shape={self.shape})"


def prefetch_group(lins: list[EffortLinear]) -> None:
    """``prefetch`` for matrices multiplied next together (q/k/v, gate/up): all their
    statistics first (the cutoff searches read them first), then their copies."""
    bs = [lin.buckets for lin in lins if lin.hook is None]
    bs = [b for b in bs if isinstance(b, pyeffort.Buckets)]  # a device's matrices: not here
    if bs:
        pyeffort.prefetch(bs)


def call_group(lins: list[EffortLinear], x: np.ndarray, effort: float) -> list[np.ndarray]:
    """``[lin(x, effort) for lin in lins]`` for matrices that share their input (q/k/v,
    gate/up). One decode token with no hooks goes through ``pyeffort.matmul_group`` (the same
    results, bit for bit: the cutoff searches and the kernels in one thread-pool job);
    anything else through each ``lin``."""
    one = x.ndim == 1 or x.shape[0] == 1
    if not one or any(lin.hook is not None for lin in lins):
        return [lin(x, effort) for lin in lins]
    efforts = [lin.own_effort(effort) for lin in lins]
    x1 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    ys, infos = pyeffort.matmul_group(x1, [lin.buckets for lin in lins], efforts, return_info=True)
    for lin, info in zip(lins, infos):
        lin.count(info, 1)
    return [y.reshape(x.shape[:-1] + y.shape) for y in ys]
