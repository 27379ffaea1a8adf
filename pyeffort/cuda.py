"""CUDA backend: effort matmuls on torch CUDA tensors (kernels in src/cuda, called through ctypes).

``B.to("cuda")`` repacks a Buckets onto the GPU (tile-major rows: each block of the matmul reads
its column tile of a dispatched row as one contiguous chunk; bytes read still scale with effort).
``pyeffort.matmul(x_cuda, B_cuda, effort)`` then runs the cutoff search and the matmul on the
device, queued on the current stream with no host round trip, so the call can be captured in a
``torch.cuda.CUDAGraph``. ``effort`` may be a one-element float64 CUDA tensor: changing it
between graph replays needs no re-capture.

The kernels are compiled at first use with ``nvcc`` (cached in ``~/.cache/pyeffort``, or
``$PYEFFORT_CUDA_CACHE``) unless ``setup.py`` built ``pyeffort/_pe_cuda.so``
(``PYEFFORT_CUDA=1 pip install .``). Nothing here is imported by a CPU-only install.

Limits: ``x`` must be finite (the check would need a host round trip; NaN/Inf give unspecified
outputs). A CudaBuckets holds its own scratch, so one matrix is used by one stream at a time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from pyeffort import _validate, reference
from pyeffort.errors import BackendError, DTypeError, LayoutError, ShapeError

GROUP = reference.GROUP
_ROOT = pathlib.Path(__file__).resolve().parent
_SRC = _ROOT.parent / "src" / "cuda"
_PDL = os.environ.get("PYEFFORT_CUDA_PDL", "1") != "0"
_lib_handle = None


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------- the compiled library


class _Matrix(ctypes.Structure):
    """Mirror of pe_cuda_matrix in src/cuda/pe_cuda.h."""

    _fields_ = [
        ("wt", ctypes.c_void_p),
        ("order", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("xval", ctypes.c_void_p),
        ("hist", ctypes.c_void_p),
        ("cand", ctypes.c_void_p),
        ("partial", ctypes.c_void_p),
        ("tickets", ctypes.c_void_p),
        ("state", ctypes.c_void_p),
        ("timing", ctypes.c_void_p),
        ("n_in", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
        ("n_rows", ctypes.c_int64),
        ("ct", ctypes.c_int32),
        ("n_tiles", ctypes.c_int32),
        ("n_splits", ctypes.c_int32),
        ("total_w", ctypes.c_ulonglong),
    ]


def _nvcc() -> str:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand:
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    raise BackendError(
        "pyeffort CUDA: nvcc not found (set NVCC or CUDA_HOME, or build with "
        "PYEFFORT_CUDA=1 pip install .)"
    )


def _arch_flags() -> list[str]:
    archs = os.environ.get("PYEFFORT_CUDA_ARCHS")
    if not archs:
        major, minor = _torch().cuda.get_device_capability()
        archs = f"{major}{minor}"
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.replace(",", ";").split(";")]


def nvcc_command(out: str, archs: list[str]) -> list[str]:
    """The nvcc command line that builds the kernel library (setup.py uses it too)."""
    sources = [str(_SRC / "select.cu"), str(_SRC / "bucketmul.cu")]
    return [
        _nvcc(),
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        *archs,
        "-o",
        out,
        *sources,
    ]


def _compiled_path() -> pathlib.Path:
    if not _SRC.is_dir():
        raise BackendError(f"pyeffort CUDA: sources {_SRC} missing and no prebuilt _pe_cuda.so")
    archs = _arch_flags()
    h = hashlib.sha256(" ".join(archs).encode())
    for f in sorted(_SRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    cache = pathlib.Path(os.environ.get("PYEFFORT_CUDA_CACHE", "~/.cache/pyeffort")).expanduser()
    path = cache / f"pe_cuda_{h.hexdigest()[:16]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    res = subprocess.run(nvcc_command(tmp, archs), check=False, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise BackendError(f"pyeffort CUDA: nvcc failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, path)
    return path


def _lib():
    """The kernel library, loaded (and compiled if needed) once."""
    global _lib_handle
    if _lib_handle is None:
        prebuilt = _ROOT / "_pe_cuda.so"
        lib = ctypes.CDLL(str(prebuilt if prebuilt.exists() else _compiled_path()))
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.pe_cuda_matmul.argtypes = [ctypes.POINTER(_Matrix), p, i32, i64, p, f64, p, i32, p, i32]
        lib.pe_cuda_select.argtypes = [ctypes.POINTER(_Matrix), p, i32, p, f64, p, i32, i32]
        lib.pe_cuda_error_string.restype = ctypes.c_char_p
        lib.pe_cuda_error_string.argtypes = [i32]
        _check(lib, lib.pe_cuda_init())
        _lib_handle = lib
    return _lib_handle


def _check(lib, status: int) -> None:
    if status:
        msg = lib.pe_cuda_error_string(status).decode()
        raise BackendError(f"pyeffort CUDA: {msg} (status {status})")


def set_pdl(enabled: bool) -> None:
    """Use programmatic dependent launch between the kernels of a call (default on)."""
    global _PDL
    _PDL = bool(enabled)


# ---------------------------------------------------------------- buckets on the device


def _dtype_code(torch, dt) -> int:
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if dt not in codes:
        raise DTypeError(f"CUDA tensors must be float16, bfloat16 or float32, got {dt}")
    return codes[dt]


class CudaBuckets:
    """A Buckets resident on a CUDA device, repacked for the GPU kernels (see module doc)."""

    def __init__(self, values, positions, stats, order, n_out: int, device=None):
        torch = _torch()
        dev = torch.device(device if device is not None else "cuda")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        as_t = lambda a: torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a
        values, positions = as_t(values).to(dev), as_t(positions).to(dev)
        stats, order = as_t(stats).to(dev), as_t(order).to(dev)
        self.device, self.n_out = dev, int(n_out)
        self.n_in, self.n_rows = int(stats.shape[1]), int(values.shape[0])
        self.n_groups = reference.n_groups(self.n_out)
        g = self.n_groups
        if values.shape != (self.n_rows, g) or positions.shape != (self.n_rows, (g + 1) // 2):
            raise ShapeError("values/positions do not match the matrix shape")
        with torch.cuda.device(dev):
            self._setup(torch, values, positions, stats, order)

    def _setup(self, torch, values, positions, stats, order):
        g, n_rows, dev = self.n_groups, self.n_rows, self.device
        ct = 128 if g >= 512 else 64 if g >= 128 else 32
        n_tiles = -(-g // ct)
        n_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        n_splits = max(1, n_sms // n_tiles)
        self.wt = repack(torch, values, positions, ct)  # (n_tiles, n_rows, 5 ct / 2) u8
        self.order = order.reshape(-1)[:n_rows].to(torch.int32).contiguous()  # (n_rows,)
        self.stats = stats.reshape(-1)[:n_rows].to(torch.float32).contiguous()  # (n_rows,)
        i32 = {"dtype": torch.int32, "device": dev}
        self._keys = torch.empty(n_rows, **i32)
        self._xval = torch.empty(n_rows, dtype=torch.float32, device=dev)
        self._hist = torch.zeros(2 * 4096, **i32)
        self._cand = torch.empty(n_rows, **i32)
        n_part = n_splits * n_tiles * 16 * ct if n_splits > 1 else 1
        self._partial = torch.empty(n_part, dtype=torch.float32, device=dev)
        self._tickets = torch.zeros(n_tiles, **i32)
        self._state = torch.zeros(8, dtype=torch.int64, device=dev)  # pe_cuda_state
        mults = np.repeat(reference.row_mults(self.n_out), self.n_in)[:n_rows]
        self.ct, self.n_tiles, self.n_splits = ct, n_tiles, n_splits
        self._m = _Matrix(
            self.wt.data_ptr(),
            self.order.data_ptr(),
            self.stats.data_ptr(),
            self._keys.data_ptr(),
            self._xval.data_ptr(),
            self._hist.data_ptr(),
            self._cand.data_ptr(),
            self._partial.data_ptr(),
            self._tickets.data_ptr(),
            self._state.data_ptr(),
            None,
            self.n_in,
            self.n_out,
            n_rows,
            ct,
            n_tiles,
            n_splits,
            int(mults.sum()),
        )

    def profile(self, enabled: bool = True):
        """Record clock stamps of the matmul kernel's phases (block 0) into ``self.timing``."""
        torch = _torch()
        self.timing = torch.zeros(32, dtype=torch.int64, device=self.device) if enabled else None
        self._m.timing = self.timing.data_ptr() if enabled else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out)

    @property
    def loaded_fraction(self) -> float:
        return self._m.total_w / (self.n_in * self.n_out)

    @property
    def nbytes(self) -> int:
        """Bytes of the bucket rows held on the device (canonical count, without tile padding)."""
        return self.n_rows * reference.row_bytes(self.n_groups)

    def __repr__(self) -> str:
        return (
            f"CudaBuckets(n_in={self.n_in}, n_out={self.n_out}, loaded_fraction="
            f"{self.loaded_fraction:.3f}, device={self.device})"
        )


def repack(torch, values, positions, ct: int):
    """Canonical rows -> tile-major chunks (n_tiles, n_rows, 5 ct / 2) u8: for each column tile
    of ct groups and each row, ct fp16 values then ct / 2 bytes of nibbles (canonical packing)."""
    n_rows, g = values.shape
    n_tiles = -(-g // ct)
    gp = n_tiles * ct
    v = torch.zeros((n_rows, gp), dtype=torch.float16, device=values.device)
    v[:, :g] = values.view(torch.float16)
    p = torch.zeros((n_rows, gp // 2), dtype=torch.uint8, device=values.device)
    p[:, : positions.shape[1]] = positions
    v8 = v.view(torch.uint8).view(n_rows, n_tiles, 2 * ct).permute(1, 0, 2)
    p8 = p.view(n_rows, n_tiles, ct // 2).permute(1, 0, 2)
    return torch.cat([v8, p8], dim=2).contiguous()


def to_device(b, device="cuda") -> CudaBuckets:
    """A host Buckets -> CudaBuckets on ``device``."""
    return CudaBuckets(b.values, b.positions, b.stats, b.order, b.n_out, device)


def build_buckets(W) -> CudaBuckets:
    """reference.build on the GPU: W (n_in, n_out) CUDA tensor (float16/bfloat16/float32) ->
    CudaBuckets, with no host copy. Same buckets as the CPU builder (checked by tests/test_cuda)."""
    torch = _torch()
    if not torch.is_tensor(W) or not W.is_cuda or W.ndim != 2:
        raise DTypeError("cuda.build_buckets takes a 2-D CUDA tensor (n_in, n_out)")
    if W.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DTypeError(f"W must be float16, bfloat16 or float32, got {W.dtype}")
    with torch.cuda.device(W.device):
        values, positions, stats, order = build_canonical(W)
        return CudaBuckets(values, positions, stats, order, W.shape[1], W.device)


def build_canonical(W):
    """W (n_in, n_out) CUDA -> canonical (values, positions, stats, order) CUDA tensors."""
    torch = _torch()
    n_in, n_out = W.shape
    g = reference.n_groups(n_out)
    w16 = W.to(torch.float16)
    if not torch.isfinite(w16).all():
        from pyeffort.errors import NonFiniteError

        raise NonFiniteError("W holds NaN or Inf (or values beyond the float16 range)")
    padded = torch.zeros((n_in, g * GROUP), dtype=torch.float16, device=W.device)
    padded[:, :n_out] = w16
    padded = padded.view(n_in, g, GROUP)
    key = padded.view(torch.int16).to(torch.int32) & 0x7FFF
    rank_to_pos = torch.sort(-key, dim=-1, stable=True).indices  # (n_in, g, 16)
    vals = torch.gather(padded, -1, rank_to_pos).permute(2, 0, 1)  # (16, n_in, g)
    pos = rank_to_pos.permute(2, 0, 1).to(torch.uint8)
    m = torch.as_tensor(np.maximum(reference.row_mults(n_out), 1), device=W.device)
    v64 = vals.to(torch.float64)
    stats = torch.sqrt((v64 * v64).sum(-1) / m[:, None]).to(torch.float32)  # (16, n_in)
    order = torch.sort(-stats, dim=1, stable=True).indices  # (16, n_in)
    idx = order[:, :, None].expand(-1, -1, g)
    values = torch.gather(vals, 1, idx).reshape(GROUP * n_in, g).contiguous()
    pos = torch.gather(pos, 1, idx).reshape(GROUP * n_in, g)
    pad = torch.zeros((GROUP * n_in, 2 * ((g + 1) // 2)), dtype=torch.uint8, device=W.device)
    pad[:, :g] = pos
    positions = (pad[:, 0::2] | (pad[:, 1::2] << 4)).contiguous()
    stats = torch.gather(stats, 1, order)
    return values, positions, stats, order.to(torch.int32)


# ---------------------------------------------------------------- matmul


def is_cuda_tensor(a) -> bool:
    return type(a).__module__.startswith("torch") and bool(getattr(a, "is_cuda", False))


def matmul(x, B, effort=1.0, *, out=None, return_info: bool = False, out_dtype=None):
    """``x @ W`` on the GPU at ``effort`` (a float, or a one-element float64 CUDA tensor).

    ``x``: CUDA tensor ``(n_in,)`` or ``(n_tokens, n_in)``, float16/bfloat16/float32, contiguous.
    Returns float32 (or ``out_dtype``: float32 or x's dtype), shaped like numpy's matmul.
    """
    torch = _torch()
    if not isinstance(B, CudaBuckets):
        raise DTypeError("CUDA activations need a CudaBuckets: use B.to('cuda')")
    if not is_cuda_tensor(x) or x.device != B.device:
        raise DTypeError(f"x must be a CUDA tensor on {B.device}")
    xd = _dtype_code(torch, x.dtype)
    if x.ndim not in (1, 2) or x.shape[-1] != B.n_in:
        raise ShapeError(
            f"x must have shape ({B.n_in},) or (n_tokens, {B.n_in}), got {tuple(x.shape)}"
        )
    if not x.is_contiguous():
        raise LayoutError("x must be contiguous")
    n_tok = 1 if x.ndim == 1 else int(x.shape[0])
    shape = (B.n_out,) if x.ndim == 1 else (n_tok, B.n_out)
    eff_ptr, eff_val = _effort(torch, effort, B.device)
    y = _output(torch, out, out_dtype, x.dtype, shape, B.device)
    lib = _lib()
    if return_info:
        B._state[6:8].zero_()
    stream = torch.cuda.current_stream(B.device).cuda_stream
    with torch.cuda.device(B.device):
        _check(
            lib,
            lib.pe_cuda_matmul(
                ctypes.byref(B._m),
                x.data_ptr(),
                xd,
                n_tok,
                eff_ptr,
                eff_val,
                y.data_ptr(),
                _dtype_code(torch, y.dtype),
                stream,
                int(_PDL),
            ),
        )
    if not return_info:
        return y
    from pyeffort.api import MatmulInfo

    mults, rows = (int(v) for v in B._state[6:8].cpu())
    total = max(n_tok, 1) * B.n_in * B.n_out
    return y, MatmulInfo(mults / total, rows * reference.row_bytes(B.n_groups), mults)


def select(x, B, effort=1.0, stages: int = 2) -> None:
    """Parts of the cutoff search of one token, for timing: ``stages=1`` the key kernel, ``2``
    the key and candidate kernels (the last two levels run inside the matmul kernel); each is
    followed by a one-block kernel that clears the histogram."""
    torch = _torch()
    eff_ptr, eff_val = _effort(torch, effort, B.device)
    stream = torch.cuda.current_stream(B.device).cuda_stream
    _check(
        _lib(),
        _lib().pe_cuda_select(
            ctypes.byref(B._m),
            x.data_ptr(),
            _dtype_code(torch, x.dtype),
            eff_ptr,
            eff_val,
            stream,
            int(_PDL),
            int(stages),
        ),
    )


def _effort(torch, effort, device):
    if torch.is_tensor(effort):
        if effort.dtype != torch.float64 or effort.numel() != 1 or effort.device != device:
            raise DTypeError(f"a tensor effort must be one float64 element on {device}")
        return effort.data_ptr(), 0.0
    return None, _validate.effort(effort)


def _output(torch, out, out_dtype, x_dtype, shape, device):
    if out is None:
        dt = out_dtype if out_dtype is not None else torch.float32
        if dt not in (torch.float32, x_dtype):
            raise DTypeError(f"out_dtype must be float32 or x's dtype {x_dtype}, got {dt}")
        return torch.empty(shape, dtype=dt, device=device)
    if not torch.is_tensor(out) or out.device != device:
        raise DTypeError(f"out must be a CUDA tensor on {device}")
    if out.dtype not in (torch.float32, x_dtype):
        raise DTypeError(f"out must be float32 or x's dtype {x_dtype}, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ShapeError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise LayoutError("out must be contiguous")
    return out
