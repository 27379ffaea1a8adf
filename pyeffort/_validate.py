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
    if not all_finite(a):
        raise NonFiniteError(f"{name} holds NaN or Inf")


def all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in a float array (float16 by its exponent bits: 20x numpy's isfinite)."""
    if a.dtype == np.float16 and a.flags.c_contiguous:
        return a.size == 0 or int(np.bitwise_and(a.view(np.uint16), 0x7C00).max()) != 0x7C00
    return bool(np.isfinite(a).all())


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


# ---------------------------------------------------------------- bucket arrays

N_RANKS = 16  # bucket rows per input (reference.N_RANKS)
MAX_N_IN = 2**31 // 16  # row indices stay in int32


def _array(name: str, a, dtype, ndim: int) -> np.ndarray:
    a = ndarray(name, a)
    if a.dtype != dtype:
        raise DTypeError(f"{name} must be {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise LayoutError(f"{name} must be C-contiguous")
    return a


def bucket_arrays(values, positions, stats, order, n_out, scales=None) -> None:
    """The structure of a matrix in bucket form, what the compiled core trusts: dtypes,
    C-contiguity, shapes against ``n_in = stats.shape[1]`` and ``n_out`` (a row prefix of a
    partial load included), every rank's ``order`` a permutation of the inputs, ``stats``
    finite, non-negative and falling inside a rank; int8 ``values`` with their fp16 ``scales``
    (the rows ``reference.scale_rows`` names for the loaded rows, ``ceil(G/4)`` columns, finite
    and non-negative), float16 ``values`` without. Raises DTypeError, ShapeError, LayoutError
    or FormatError (for the contents of ``stats``, ``order`` and ``scales``)."""
    from pyeffort.errors import FormatError

    values = ndarray("values", values)
    if values.dtype not in (np.float16, np.int8):
        raise DTypeError(f"values must be float16 or int8 (q8), got {values.dtype}")
    values = _array("values", values, values.dtype, 2)
    positions = _array("positions", positions, np.uint8, 2)
    stats = _array("stats", stats, np.float32, 2)
    order = _array("order", order, np.int32, 2)
    if isinstance(n_out, bool) or not isinstance(n_out, numbers.Integral) or n_out < 1:
        raise ShapeError(f"n_out must be a positive integer, got {n_out!r}")
    n_in, g = stats.shape[1], (int(n_out) + 15) // 16
    if stats.shape[0] != N_RANKS or not 1 <= n_in < MAX_N_IN or order.shape != stats.shape:
        raise ShapeError(f"stats and order must be (16, n_in), got {stats.shape}, {order.shape}")
    rows = values.shape[0]
    if values.shape[1] != g or rows > N_RANKS * n_in:
        raise ShapeError(f"values {values.shape} do not fit n_in={n_in}, n_out={n_out} (G={g})")
    if positions.shape != (rows, (g + 1) // 2):
        raise ShapeError(f"positions {positions.shape} do not fit values {values.shape}")
    if not np.isfinite(stats).all() or (stats < 0).any():
        raise FormatError("row statistics must be finite and non-negative")
    if (np.diff(stats, axis=1) > 0).any():
        raise FormatError("rows inside a rank are not ordered by statistic")
    if (order < 0).any() or (order >= n_in).any():
        raise FormatError(f"row order names inputs outside 0..{n_in - 1}")
    if (np.sort(order, axis=1) != np.arange(n_in, dtype=np.int32)).any():
        raise FormatError("row order is not a permutation of the inputs in every rank")
    _scales(values, scales, n_in)


def _scales(values: np.ndarray, scales, n_in: int) -> None:
    """int8 values need their fp16 scales (structure checked), float16 values none."""
    from pyeffort import reference
    from pyeffort.errors import FormatError

    if values.dtype == np.float16:
        if scales is not None:
            raise DTypeError("float16 values take no scales (scales are for int8 values)")
        return
    if scales is None:
        raise DTypeError("int8 (q8) values need their scales")
    scales = _array("scales", scales, np.float16, 2)
    n_rows, g = values.shape
    shape = (reference.scale_rows(n_rows, n_in), reference.n_chunks(g))
    if scales.shape != shape:
        raise ShapeError(f"scales {scales.shape} do not fit values {values.shape}: need {shape}")
    bits = scales.view(np.uint16)
    if bits.size and (int(np.bitwise_and(bits, 0x7C00).max()) == 0x7C00 or bits.max() > 0x8000):
        raise FormatError("q8 scales must be finite and non-negative")


def bucket_data(values, positions, order, n_out: int) -> None:
    """The data of a matrix in bucket form (structure checked): values finite (float16) or in
    -127..127 (int8); in every (input, group) the loaded ranks' positions distinct; in the last
    group, when n_out is not a multiple of 16 (r = n_out % 16 real outputs), ranks below r at
    positions below r and the others at padding positions with zero values, as the build
    writes them. Raises FormatError.

    One pass per rank. Distinct positions: per (input, group) the sum of ``1 << position`` over
    the loaded ranks (modulo 2**16) has as many bits set as ranks were loaded only if no position
    repeats (a repeat carries, and carries only lose bits)."""
    from pyeffort.errors import FormatError

    n_rows, g = values.shape
    n_in, r, half = order.shape[1], n_out % 16, (g + 1) // 2
    acc = np.zeros((2, n_in, half), dtype=np.uint16)  # even, odd groups: sum of 1 << position
    bits = np.empty_like(acc)
    q16 = np.empty((n_in, half), dtype=np.uint16)  # this rank's position bytes by input
    exp16 = np.empty((n_in, g), dtype=np.uint16)
    loaded = np.zeros(n_in, dtype=np.uint16)  # ranks loaded per input
    for k in range(min(N_RANKS, -(-n_rows // n_in))):
        lo, hi = k * n_in, min(n_rows, (k + 1) * n_in)
        v = _value_bits(np.asarray(values[lo:hi]), exp16[: hi - lo])
        q, inputs = np.asarray(positions[lo:hi]), order[k, : hi - lo]
        q16[:] = 0
        q16[inputs] = q
        np.bitwise_and(q16, 0x0F, out=bits[0])
        np.right_shift(q16, 4, out=bits[1])
        np.left_shift(np.uint16(1), bits, out=bits)
        if hi - lo < n_in:  # a partial rank: the inputs without it add nothing
            bits[:, np.setdiff1d(np.arange(n_in), inputs)] = 0
        np.add(acc, bits, out=acc)
        loaded[inputs] += 1
        if r:
            last = (q[:, -1] >> 4) if g % 2 == 0 else (q[:, -1] & 0x0F)
            pad = (last >= r) if k < r else (last < r) | _nonzero(v[:, g - 1])
            if pad.any():
                raise FormatError(
                    f"rank {k} of the last group breaks its padding (n_out={n_out} does not "
                    "match the data)"
                )
    if g % 2:
        acc[1, :, -1] = (1 << loaded.astype(np.uint32)) - 1  # the unused high nibble: no group
    if (_popcount16(acc) != loaded[None, :, None]).any():
        raise FormatError("two ranks of a group share a position")


def _value_bits(v: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """One rank's values, checked (float16 finite, int8 not -128) -> their bits (float16 as
    uint16, int8 as is)."""
    from pyeffort.errors import FormatError

    if v.dtype == np.int8:
        if v.size and v.min() == -128:
            raise FormatError("q8 bucket values hold -128 (the range is -127..127)")
        return v
    bits = v.view(np.uint16)
    if np.bitwise_and(bits, 0x7C00, out=scratch).max() == 0x7C00:
        raise FormatError("bucket values hold NaN or Inf")
    return bits


def _nonzero(bits: np.ndarray) -> np.ndarray:
    """Values (as _value_bits gives them) other than +-0."""
    return (bits != 0) if bits.dtype == np.int8 else (bits & 0x7FFF) != 0


def _popcount16(a: np.ndarray) -> np.ndarray:
    """Bits set in each element of a uint16 array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(a)
    a = a - ((a >> 1) & 0x5555)
    a = (a & 0x3333) + ((a >> 2) & 0x3333)
    a = (a + (a >> 4)) & 0x0F0F
    return ((a + (a >> 8)) & 0x1F).astype(np.uint8)
