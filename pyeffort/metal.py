"""Metal backend (Apple GPUs): effort matmuls on the canonical bucket rows, kernels in src/metal.

Built and run only on macOS (``pyeffort._metal``, the Objective-C host src/metal/pe_metal.m,
built by setup.py there); **this project has not run it on Apple hardware**. What is checked, in
CI on Linux, is the kernels: src/metal/*.metal compiled as C++17 against a shim of the Metal
Shading Language and run by a threadgroup simulator against reference.py (tests/metal_shim,
tests/test_metal_shim.py). Elsewhere every entry point raises BackendError saying why.

``B.to("metal")`` puts a Buckets on the GPU: its arrays are shared with it, without a copy where
they are page-aligned (a memory-mapped file), fp16 or q8 values. ``pyeffort.matmul(x, B_metal,
effort)`` then encodes the cutoff search (kernel_select), the matmul on the dispatched rows and
the sum of its splits into one command buffer, with no CPU wait inside, and waits for it to
return numpy arrays. A decoding step can keep one command buffer for all its matmuls::

    with metal.token():                  # one command buffer, committed at the end
        metal.matmul(xq, Bq, 0.5, out=yq)   # xq, yq: MetalArray (shared memory, no copies)
        ...
    yq.numpy()

``show_runtime()`` names the Metal device or says why there is none.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import pathlib
import sys

import numpy as np

from pyeffort import _validate, reference
from pyeffort._devices import GROUP_MAX, MatmulInfo
from pyeffort.errors import STATUS_DEVICE, BackendError, DTypeError, ShapeError, status_error

VALUE_KINDS = ("f16", "q8")  # value kinds with kernels here (Buckets.to checks it)
SOURCES = ("select.metal", "bucketmul.metal", "dense.metal", "reduce.metal")
HEADER = "pe_metal.h"
TILE_OUTPUTS = 1024  # outputs per column tile of the effort kernels (pe_metal.h)
NOT_RUN = "not yet run on Apple hardware by this project"  # what show_runtime() says too
_ROOT = pathlib.Path(__file__).resolve().parent
_lib_handle = None
_in_token = False


def scale_rows_of(order: np.ndarray, n_rows: int) -> np.ndarray:
    """(16, n_in) order -> (n_rows,) uint32: the row of q8 ``scales`` of each loaded bucket row
    (what kernel_bucketmul_q8 reads as ``srow``)."""
    return reference._tier_position(np.asarray(order)).ravel()[:n_rows].astype(np.uint32)


def bytes_read(rows: np.ndarray, n_groups: int, srow: np.ndarray | None = None) -> int:
    """Weight bytes a token's dispatched ``rows`` read, as reference.bucketmul counts them:
    their values and positions, and (q8, ``srow`` given) the scales of each dispatched tier of
    an input once."""
    n = len(rows) * reference.row_bytes(n_groups, srow is not None)
    if srow is not None:
        n += 2 * reference.n_chunks(n_groups) * len(np.unique(srow[rows]))
    return int(n)


# ---------------------------------------------------------------- the host library


class _Matrix(ctypes.Structure):
    """Mirror of pe_metal_matrix in src/metal/pe_metal.m."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("values", "positions", "stats", "order")] + [
        ("scales", ctypes.c_void_p),
        ("srow", ctypes.c_void_p),
        ("n_in", ctypes.c_uint32),
        ("n_out", ctypes.c_uint32),
        ("n_rows", ctypes.c_uint32),
    ]


class _Scratch(ctypes.Structure):
    """Mirror of pe_metal_scratch in src/metal/pe_metal.m."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("keys", "rows", "info", "partial")]


def source_dir(root: pathlib.Path = _ROOT) -> pathlib.Path:
    """The kernel sources: ``_metal_src`` in the package (a macOS wheel) or ``src/metal``."""
    for cand in (root / "_metal_src", root.parent / "src" / "metal"):
        if all((cand / f).is_file() for f in (*SOURCES, HEADER)):
            return cand
    raise BackendError(f"pyeffort Metal: the kernel sources are not in {root / '_metal_src'}")


def library_source(folder: pathlib.Path | None = None) -> str:
    """Every kernel in one Metal source, pe_metal.h inlined: what the host compiles at first use
    when no .metallib was built (newLibraryWithSource has no include path)."""
    d = source_dir() if folder is None else folder
    header = (d / HEADER).read_text().replace("#pragma once\n", "")
    parts = [header]
    for name in SOURCES:
        text = (d / name).read_text().replace(f'#include "{HEADER}"', f"/* {HEADER}: above */")
        parts.append(f"/* ---- {name} */\n{text}")
    return "\n".join(parts)


def unavailable_reason() -> str | None:
    """Why the Metal backend cannot run here (None: it can)."""
    if sys.platform != "darwin":
        return f"Metal runs only on macOS (this is {sys.platform})"
    try:
        _lib()
    except BackendError as exc:
        return str(exc).removeprefix("pyeffort Metal: ")
    return None


def require() -> None:
    """Raises BackendError saying why, unless the Metal backend can run here (``--device metal``)."""
    reason = unavailable_reason()
    if reason is not None:
        raise BackendError(f"pyeffort Metal: {reason}")


def runtime_line() -> str:
    """What show_runtime() says of Metal: the device, or why there is none."""
    reason = unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason} (the Metal backend is {NOT_RUN})"
    return f"{_lib().pe_metal_device_name().decode()} (the Metal backend is {NOT_RUN})"


def _lib():
    """The host library, loaded and initialised once."""
    global _lib_handle
    if _lib_handle is not None:
        return _lib_handle
    if sys.platform != "darwin":
        raise BackendError(f"pyeffort Metal: Metal runs only on macOS (this is {sys.platform})")
    try:
        _metal = importlib.import_module("pyeffort._metal")  # built by setup.py on macOS only
    except ImportError as exc:
        raise BackendError(
            "pyeffort Metal: pyeffort was built without its Metal host (pyeffort._metal): "
            f"reinstall on macOS with Xcode's command line tools ({exc})"
        ) from None
    lib = ctypes.CDLL(_metal.__file__)
    _types(lib)
    metallib = _ROOT / "_metal.metallib"
    status = lib.pe_metal_init(
        str(metallib).encode() if metallib.exists() else None, library_source().encode()
    )
    _check(lib, status)
    _lib_handle = lib
    return lib


def _types(lib) -> None:
    p, u32, i32, f64, sz = (
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_double, ctypes.c_size_t
    )  # fmt: skip
    for name, res, args in [
        ("pe_metal_init", i32, [ctypes.c_char_p, ctypes.c_char_p]),
        ("pe_metal_error", ctypes.c_char_p, []),
        ("pe_metal_device_name", ctypes.c_char_p, []),
        ("pe_metal_buffer_wrap", p, [p, sz, ctypes.POINTER(i32)]),
        ("pe_metal_buffer_new", p, [sz]),
        ("pe_metal_buffer_contents", p, [p]),
        ("pe_metal_buffer_free", None, [p]),
        ("pe_metal_commit", i32, [i32]),
        ("pe_metal_begin", None, []),
        ("pe_metal_end", i32, [i32]),
        ("pe_metal_effort", i32, [ctypes.POINTER(_Matrix), p, i32, u32, f64, p, i32,
                                  ctypes.POINTER(_Scratch), u32]),
        ("pe_metal_dense", i32, [p, u32, u32, p, i32, u32, p, i32, p, u32]),
    ]:  # fmt: skip
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _check(lib, status: int) -> None:
    if status:
        detail = lib.pe_metal_error().decode() if status >= STATUS_DEVICE else ""
        raise status_error(status, "pyeffort Metal", detail)


# ---------------------------------------------------------------- buffers


class MetalArray:
    """An array in memory the CPU and the GPU share (an MTLBuffer): ``numpy()`` is a view of it,
    read once the command buffer that writes it is done (after ``token()``)."""

    def __init__(self, shape, dtype=np.float32, *, _wrap: np.ndarray | None = None):
        lib = _lib()
        self.shape, self.dtype = tuple(int(n) for n in np.atleast_1d(shape)), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._keep = _wrap  # a wrapped host array lives as long as its buffer
        if _wrap is None:
            self.handle = lib.pe_metal_buffer_new(self.nbytes)
        else:
            copied = ctypes.c_int(0)
            self.handle = lib.pe_metal_buffer_wrap(_wrap.ctypes.data, self.nbytes, copied)
            self.copied = bool(copied.value)
        if not self.handle:
            raise MemoryError(f"pyeffort Metal: no buffer of {self.nbytes} bytes")

    @classmethod
    def wrap(cls, a: np.ndarray) -> MetalArray:
        """A buffer over the C-contiguous array ``a`` (no copy where page-aligned; ``a`` must
        not change while the buffer lives)."""
        a = np.ascontiguousarray(a)
        return cls(a.shape, a.dtype, _wrap=a)

    def numpy(self) -> np.ndarray:
        ptr = _lib().pe_metal_buffer_contents(self.handle)
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(ptr)
        raw._owner = self  # the view keeps the buffer alive
        return np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(self.shape))).reshape(
            self.shape
        )

    def __del__(self):
        if getattr(self, "handle", None) and _lib_handle is not None:
            _lib_handle.pe_metal_buffer_free(self.handle)
            self.handle = None


def empty(shape, dtype=np.float32) -> MetalArray:
    """An uninitialised MetalArray (float32 or float16)."""
    return MetalArray(shape, dtype)


@contextlib.contextmanager
def token():
    """The matmuls inside go into one command buffer, committed and waited for at the end."""
    global _in_token
    if _in_token:
        raise RuntimeError("metal.token() blocks do not nest")
    lib = _lib()
    lib.pe_metal_begin()
    _in_token = True
    try:
        yield
    finally:
        _in_token = False
        _check(lib, lib.pe_metal_end(1))


# ---------------------------------------------------------------- buckets on the GPU


class MetalBuckets:
    """A Buckets whose arrays the GPU reads (pyeffort.metal). ``splits``: shares of the
    dispatched rows per column tile (by default about 256 threadgroups per token; untuned)."""

    backend = "metal"  # the device backend pyeffort.matmul dispatches to (pyeffort._devices)

    def __init__(self, b, *, splits: int | None = None):
        self.n_in, self.n_out, self.n_rows = b.n_in, b.n_out, b.n_rows
        self.n_groups, self.values_kind = b.n_groups, b.values_kind
        if self.n_in * self.n_out >= 2**32 or 16 * self.n_in >= 2**31:
            raise ShapeError("the Metal kernels take matrices of fewer than 2**32 weights")
        order = np.ravel(b.order)[: self.n_rows].astype(np.int32)
        stats = np.ravel(b.stats)[: self.n_rows].astype(np.float32)
        self.srow = None if b.scales is None else scale_rows_of(b.order, self.n_rows)
        arrays = {"values": b.values, "positions": b.positions, "stats": stats, "order": order}
        if b.scales is not None:
            arrays.update(scales=b.scales, srow=self.srow)
        self._bufs = {k: MetalArray.wrap(np.asarray(a)) for k, a in arrays.items()}
        h = {k: v.handle for k, v in self._bufs.items()}
        self._m = _Matrix(
            h["values"], h["positions"], h["stats"], h["order"], h.get("scales"), h.get("srow"),
            self.n_in, self.n_out, self.n_rows,
        )  # fmt: skip
        n_tiles = -(-self.n_out // TILE_OUTPUTS)
        self.splits = int(splits) if splits else max(1, min(64, 256 // n_tiles))
        if not 1 <= self.splits <= 1024:
            raise ValueError(f"splits must be in 1..1024, got {splits}")
        self._scratch: dict[int, tuple] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out)

    def scratch(self, n_tok: int):
        """The buffers of a call on n_tok tokens (kept per token count)."""
        if n_tok not in self._scratch:
            rows = MetalArray((n_tok, max(self.n_rows, 1)), np.uint32)
            keys = MetalArray((n_tok, max(self.n_rows, 1)), np.uint32)
            info = MetalArray((n_tok, 4), np.uint32)
            partial = MetalArray((n_tok, self.splits, self.n_out), np.float32)
            bufs = (keys, rows, info, partial)
            self._scratch[n_tok] = (bufs, _Scratch(*(a.handle for a in bufs)))
        return self._scratch[n_tok]

    def __repr__(self) -> str:
        return f"MetalBuckets(n_in={self.n_in}, n_out={self.n_out}, values={self.values_kind!r})"


def to_device(b, device="metal", **kw) -> MetalBuckets:
    """A host Buckets -> MetalBuckets (kw: splits)."""
    return MetalBuckets(b, **kw)


def _encode(B: MetalBuckets, x: MetalArray, n_tok: int, e: float, y: MetalArray) -> None:
    lib = _lib()
    _, scr = B.scratch(n_tok)
    x_half, y_half = int(x.dtype == np.float16), int(y.dtype == np.float16)
    status = lib.pe_metal_effort(
        ctypes.byref(B._m), x.handle, x_half, n_tok, e, y.handle, y_half, ctypes.byref(scr),
        B.splits,
    )  # fmt: skip
    _check(lib, status)


def _info(B: MetalBuckets, n_tok: int) -> MatmulInfo:
    (_, rows, info, _), _ = B.scratch(n_tok)
    r, inf = rows.numpy(), info.numpy()
    mults = int(inf[:, 2].astype(np.int64).sum())
    nbytes = sum(bytes_read(r[t, : inf[t, 1]], B.n_groups, B.srow) for t in range(n_tok))
    return MatmulInfo(mults / (max(n_tok, 1) * B.n_in * B.n_out), nbytes, mults)


def _activations(x, n_in: int) -> tuple[MetalArray, int, bool]:
    """x: a MetalArray, or a numpy array copied into one -> (buffer, n_tok, was 1-D)."""
    if isinstance(x, MetalArray):
        if x.dtype not in (np.float16, np.float32) or x.shape[-1] != n_in or len(x.shape) > 2:
            raise ShapeError(f"x must be float16/32 (n_in,) or (n_tokens, {n_in}), got {x.shape}")
        return x, (1 if len(x.shape) == 1 else x.shape[0]), len(x.shape) == 1
    x2, vector = _validate.activations(x, n_in)
    _validate.finite("x", x2)
    src = np.asarray(x).reshape(x2.shape) if np.asarray(x).dtype == np.float16 else x2
    buf = MetalArray(src.shape, src.dtype)
    buf.numpy()[...] = src
    return buf, x2.shape[0], vector


def _output(out, x, shape) -> MetalArray:
    """out=None (a new float32 MetalArray) or a float16/32 MetalArray of ``shape``; inside
    token() both x and out must be MetalArrays (nothing is read back before its end)."""
    if out is not None and (
        not isinstance(out, MetalArray)
        or out.shape != shape
        or out.dtype not in (np.float16, np.float32)
    ):
        raise ShapeError(f"out must be a float16/32 MetalArray of shape {shape}")
    if _in_token and (out is None or not isinstance(x, MetalArray)):
        raise ValueError("inside metal.token() pass MetalArrays for x and out")
    return out if out is not None else MetalArray(shape, np.float32)


def _done(y: MetalArray, out):
    """Outside token(): commit, wait, and y as numpy (or ``out`` itself)."""
    if _in_token:
        return y
    _check(_lib(), _lib().pe_metal_commit(1))
    return y if out is not None else y.numpy().copy()


def matmul(x, W, effort=1.0, *, out=None, return_info: bool = False):
    """``x @ W`` on the GPU at ``effort``. ``x``: numpy or MetalArray, float16/32, ``(n_in,)``
    or ``(n_tokens, n_in)``; ``out``: None or a MetalArray (float32 or float16) of the result's
    shape. Inside ``token()`` only MetalArrays, and no ``return_info`` (nothing has run yet)."""
    if not isinstance(W, MetalBuckets):
        raise DTypeError("a Metal matmul needs a MetalBuckets: use B.to('metal')")
    if _in_token and return_info:
        raise ValueError("return_info needs the result: call matmul outside metal.token()")
    e = _validate.effort(effort)
    xb, n_tok, vector = _activations(x, W.n_in)
    y = _output(out, x, (W.n_out,) if vector else (n_tok, W.n_out))
    _encode(W, xb, n_tok, e, y)
    result = _done(y, out)
    return (result, _info(W, n_tok)) if return_info and not _in_token else result


def matmul_group(x, Ws, effort=1.0, *, return_info: bool = False):
    """``[matmul(x, W, e) for W, e in zip(Ws, efforts)]`` in one command buffer (up to
    GROUP_MAX MetalBuckets with one n_in; ``effort``: one, or one per matrix)."""
    Ws = list(Ws) if isinstance(Ws, (list, tuple)) else Ws
    if not isinstance(Ws, list) or not 1 <= len(Ws) <= GROUP_MAX:
        raise ShapeError(f"Ws must be a list of 1 to {GROUP_MAX} MetalBuckets")
    if any(not isinstance(W, MetalBuckets) or W.n_in != Ws[0].n_in for W in Ws):
        raise ShapeError("the matrices of a group are MetalBuckets sharing n_in")
    efforts = list(effort) if isinstance(effort, (list, tuple, np.ndarray)) else [effort] * len(Ws)
    if len(efforts) != len(Ws):
        raise ShapeError(f"{len(efforts)} efforts for {len(Ws)} matrices")
    if _in_token:
        raise ValueError("matmul_group returns arrays: call it outside metal.token()")
    xb, n_tok, vector = _activations(x, Ws[0].n_in)
    ys = [MetalArray((W.n_out,) if vector else (n_tok, W.n_out)) for W in Ws]
    lib = _lib()
    lib.pe_metal_begin()
    try:
        for W, e, y in zip(Ws, efforts, ys):
            _encode(W, xb, n_tok, _validate.effort(e), y)
    finally:
        _check(lib, lib.pe_metal_end(1))
    arrays = [y.numpy().copy() for y in ys]
    return (arrays, [_info(W, n_tok) for W in Ws]) if return_info else arrays


class MetalDense:
    """A float16 W (n_in, n_out) the GPU reads: the dense baseline (``dense_matmul``)."""

    def __init__(self, w16: np.ndarray, splits: int | None = None):
        w16 = _validate.ndarray("W", w16)
        if w16.dtype != np.float16 or w16.ndim != 2 or w16.size >= 2**32:
            raise DTypeError("MetalDense takes a 2-D float16 W of fewer than 2**32 weights")
        self.n_in, self.n_out = w16.shape
        self.w = MetalArray.wrap(w16)
        self.splits = int(splits) if splits else max(1, min(64, 256 // -(-self.n_out // 128)))
        self._partial: dict[int, MetalArray] = {}  # per token count

    def partial(self, n_tok: int) -> MetalArray:
        if n_tok not in self._partial:
            self._partial[n_tok] = MetalArray((n_tok, self.splits, self.n_out), np.float32)
        return self._partial[n_tok]


def dense_matmul(x, W: MetalDense, *, out=None):
    """x (n_in,) or (n_tokens, n_in) @ W on the GPU, float32 accumulation -> float32 numpy
    (or ``out``, a MetalArray; inside ``token()`` MetalArrays only, as ``matmul``)."""
    if not isinstance(W, MetalDense):
        raise DTypeError("metal.dense_matmul needs a MetalDense")
    xb, n_tok, vector = _activations(x, W.n_in)
    y = _output(out, x, (W.n_out,) if vector else (n_tok, W.n_out))
    lib = _lib()
    x_half, y_half = int(xb.dtype == np.float16), int(y.dtype == np.float16)
    status = lib.pe_metal_dense(
        W.w.handle, W.n_in, W.n_out, xb.handle, x_half, n_tok, y.handle, y_half,
        W.partial(n_tok).handle, W.splits,
    )  # fmt: skip
    _check(lib, status)
    return _done(y, out)
