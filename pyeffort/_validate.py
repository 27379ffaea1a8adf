"""Input checks shared by the public functions: every bad input becomes a named exception here,
before any C code runs."""

from __future__ import annotations

import math
import numbers

import numpy as np

from pyeffort.errors import DTypeError, EffortError, LayoutError, NonFiniteError, ShapeError

ACTIVATION_DTYPES = (np.float16, np.float32)


def effort(value, name: str = "effort") -> float:
    """A real number in [0, 1] -> float."""
    if type(value) is float and 0.0 <= value <= 1.0:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EffortError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    e = float(value)
    if not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise EffortError(f"{name} must be in [0, 1], got {e!r}")
    return e


def ndarray(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    return a


def activations(x, n_in: int) -> tuple[np.ndarray, bool]:
    """x (n_in,) or (n_tokens, n_in), float16/32, C-contiguous -> (x as 2-D float32, was 1-D)."""
    x = ndarray("x", x)
    if x.dtype not in ACTIVATION_DTYPES:
        raise DTypeError(f"x must be float16 or float32, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ShapeError(f"x must have shape (n_in,) or (n_tokens, n_in), got {x.shape}")
    if x.shape[-1] != n_in:
        raise ShapeError(f"x has {x.shape[-1]} inputs but the matrix has n_in={n_in}")
    if not x.flags.c_contiguous:
        raise LayoutError("x must be C-contiguous (use np.ascontiguousarray)")
    vector = x.ndim == 1
    x2 = x.reshape(1, -1) if vector else x
    return np.ascontiguousarray(x2, dtype=np.float32), vector


def output(out, n_tokens: int, n_out: int, vector: bool) -> np.ndarray:
    """out=None or a float32 C-contiguous array of the result's shape -> a 2-D float32 view."""
    shape = (n_out,) if vector else (n_tokens, n_out)
    if out is None:
        return np.empty((n_tokens, n_out), dtype=np.float32)
    out = ndarray("out", out)
    if out.dtype != np.float32:
        raise DTypeError(f"out must be float32, got {out.dtype}")
    if out.shape != shape:
        raise ShapeError(f"out must have shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise LayoutError("out must be a writeable C-contiguous array")
    return out.reshape(n_tokens, n_out)


def finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{name} holds NaN or Inf")


def weight_matrix(w, what: str = "W") -> np.ndarray:
    """A 2-D float16/float32/bfloat16 array (numpy, ml_dtypes or torch) -> float16 (n_in, n_out)."""
    if hasattr(w, "detach") and hasattr(w, "float"):  # a torch tensor, bfloat16 included
        w = w.detach().float().cpu().numpy()
    w = ndarray(what, w)
    if w.dtype.name not in ("float16", "float32", "bfloat16"):
        raise DTypeError(f"{what} must be float16, float32 or bfloat16, got {w.dtype}")
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ShapeError(f"{what} must be a non-empty 2-D matrix, got shape {w.shape}")
    if w.shape[0] >= 2**31 // 16:
        raise ShapeError(f"{what} has too many rows ({w.shape[0]})")
    w32 = w if w.dtype == np.float16 else w.astype(np.float32)
    finite(what, w32)
    if w.dtype != np.float16 and np.abs(w32).max() > 65504.0:
        raise ValueError(f"{what} has values beyond the float16 range (|w| > 65504)")
    return np.ascontiguousarray(w32, dtype=np.float16)


def out_weight(a, n_out: int) -> np.ndarray:
    """Per-output weights (n_out,): a float array, finite, non-negative, not all zero ->
    float32."""
    a = ndarray("out_weight", a)
    if a.dtype.kind != "f":
        raise DTypeError(f"out_weight must be a float array, got {a.dtype}")
    if a.shape != (n_out,):
        raise ShapeError(f"out_weight must have shape ({n_out},) (one per output), got {a.shape}")
    a32 = np.ascontiguousarray(a, dtype=np.float32)
    finite("out_weight", a32)
    if (a32 < 0).any():
        raise ValueError("out_weight must be non-negative")
    if not (a32 > 0).any():
        raise ValueError("out_weight is all zero: no output would be ranked")
    return a32
