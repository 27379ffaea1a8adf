"""The dense 8-bit baseline: what a user runs instead of effort at equal weight precision.

``DenseQ8`` is ggml's Q8_0 for ``y = x @ W``, ``W`` ``(n_in, n_out)``: int8 weights ``q``
``(n_in, n_out)`` in [-127, 127] and one fp16 scale per 32 consecutive inputs of each output,
``scales`` ``(ceil(n_in / 32), n_out)``; ``W[i, j] = q[i, j] * scales[i // 32, j]`` (exact in
float32). 1 + 2 / 32 = 1.0625 bytes per weight. The scale of a block is
``reference.q8_scale`` of its largest ``|w|`` (the bucket values' rule: nothing is clipped).
"""

from __future__ import annotations

import numpy as np

from pyeffort import _validate
from pyeffort.errors import DTypeError, FormatError, LayoutError, ShapeError
from pyeffort.reference import Q8_MAX, q8_scale

BLOCK = 32  # inputs per scale


def n_blocks(n_in: int) -> int:
    return -(-n_in // BLOCK)


class DenseQ8:
    """A matrix ``(n_in, n_out)`` as int8 weights with an fp16 scale per 32 inputs of each
    output (Q8_0); ``pyeffort.dense_matmul(x, Wq)`` multiplies by it. The arrays are checked
    (int8 -128, a non-finite or negative scale: ``FormatError``) and kept read-only.

    >>> import numpy as np, pyeffort
    >>> Wq = pyeffort.quantize_dense_q8(np.full((64, 3), 0.5, dtype=np.float16))
    >>> Wq.shape, Wq.scales.shape, Wq.bytes_per_weight
    ((64, 3), (2, 3), 1.0625)
    """

    __slots__ = ("q", "scales")

    def __init__(self, q: np.ndarray, scales: np.ndarray):
        q, scales = _validate.ndarray("q", q), _validate.ndarray("scales", scales)
        if q.dtype != np.int8 or scales.dtype != np.float16:
            got = f"{q.dtype}, {scales.dtype}"
            raise DTypeError(f"DenseQ8 takes int8 q and float16 scales, got {got}")
        if q.ndim != 2 or 0 in q.shape:
            raise ShapeError(f"q must be a non-empty 2-D matrix, got shape {q.shape}")
        if scales.shape != (n_blocks(q.shape[0]), q.shape[1]):
            want = (n_blocks(q.shape[0]), q.shape[1])
            raise ShapeError(f"scales must have shape {want} for q {q.shape}, got {scales.shape}")
        if not (q.flags.c_contiguous and scales.flags.c_contiguous):
            raise LayoutError("q and scales must be C-contiguous")
        if (q == -128).any():
            raise FormatError("q holds -128 (int8 weights lie in [-127, 127])")
        if not _validate.all_finite(scales) or (scales.view(np.uint16) >> 15).any():
            raise FormatError("scales must be finite and not negative")
        self.q, self.scales = _readonly(q), _readonly(scales)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: the int8 weights and the fp16 scales."""
        return self.q.nbytes + self.scales.nbytes

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / self.q.size

    def dequantize(self) -> np.ndarray:
        """The weights it stands for, float32 ``(n_in, n_out)`` (exact)."""
        s = np.repeat(self.scales.astype(np.float32), BLOCK, axis=0)[: self.q.shape[0]]
        return self.q.astype(np.float32) * s

    def __repr__(self) -> str:
        return f"DenseQ8(shape={self.shape}, bytes_per_weight={self.bytes_per_weight:.4f})"


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def quantize_dense_q8(W) -> DenseQ8:
    """``W`` ``(n_in, n_out)`` float16 or float32, finite -> its Q8_0 quantisation: per 32
    inputs of each output the scale ``q8_scale(max |w|)`` and ``q = round(w / scale)``.

    >>> import numpy as np, pyeffort
    >>> W = np.linspace(-1, 1, 40 * 2, dtype=np.float32).reshape(40, 2)
    >>> Wq = pyeffort.quantize_dense_q8(W)
    >>> float(np.abs(Wq.dequantize() - W).max()) < 0.5 * float(Wq.scales.max())
    True
    """
    W = _validate.ndarray("W", W)
    if W.dtype not in (np.float16, np.float32):
        raise DTypeError(f"quantize_dense_q8 takes a float16 or float32 W, got {W.dtype}")
    if W.ndim != 2 or 0 in W.shape:
        raise ShapeError(f"W must be a non-empty 2-D matrix, got shape {W.shape}")
    _validate.finite("W", W)
    n_in, n_out = W.shape
    nb = n_blocks(n_in)
    w = np.zeros((nb * BLOCK, n_out), dtype=np.float32)
    w[:n_in] = W
    blocks = w.reshape(nb, BLOCK, n_out)
    scales = q8_scale(np.abs(blocks).max(axis=1))  # (nb, n_out) fp16
    s = scales.astype(np.float32)[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(s > 0, np.clip(np.rint(blocks / s), -Q8_MAX, Q8_MAX), 0).astype(np.int8)
    return DenseQ8(np.ascontiguousarray(q.reshape(nb * BLOCK, n_out)[:n_in]), scales)


def dense_q8(x32: np.ndarray, q: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """The reference: x (n_tokens, n_in) f32 @ the dequantised Q8_0 matrix -> out (n_tokens,
    n_out) f32, in float64."""
    s = np.repeat(np.asarray(scales).astype(np.float32), BLOCK, axis=0)[: q.shape[0]]
    w = (np.asarray(q).astype(np.float32) * s).astype(np.float64)
    out[...] = x32.astype(np.float64) @ w
