"""CUDA backend: effort matmuls on torch CUDA tensors (kernels in src/cuda, called through ctypes).

``B.to("cuda")`` repacks a Buckets onto the GPU (tile-major rows: each block of the matmul reads
its column tile of a dispatched row as one contiguous chunk; bytes read still scale with effort).
Both value kinds run (``VALUE_KINDS``): fp16 values (2.5 bytes per multiplication) and q8 values
(int8 with an fp16 scale per tier of 4 ranks of an input and 4 groups, reference.py): their
repack keeps a tier of an input as one record, its scales then its 4 rows (1.625 bytes per
multiplication, as the file), and the kernel applies the scale as it adds a row.
``pyeffort.matmul(x_cuda, B_cuda, effort)`` then runs the cutoff search and the matmul on the
device as one cooperative kernel, queued on the current stream with no host round trip, so the
call can be captured in a ``torch.cuda.CUDAGraph``. ``effort`` may be a one-element float64 CUDA
tensor: changing it between graph replays needs no re-capture. ``matmul_group(x, CudaGroup([Bq,
Bk, Bv]), effort)`` runs several matrices that share their input in one kernel (each with its own
cutoff: the same results as separate calls), at one effort or one per matrix (a float64 CUDA
tensor of one per matrix, read by the kernel: a model's budget split in a graph).

The kernels are compiled at first use with ``nvcc`` from the CUDA sources shipped in the
package (``pyeffort/_cuda_src``; ``src/cuda`` in a source checkout), cached in
``~/.cache/pyeffort`` (or ``$PYEFFORT_CUDA_CACHE``), unless ``setup.py`` built
``pyeffort/_pe_cuda.so`` (``PYEFFORT_CUDA=1 pip install .``; ``$PYEFFORT_CUDA_LIB`` names
another build). Nothing here is imported by a CPU-only install. Failures raise through
``pyeffort.errors.status_error``, as the C core's.

Limits: ``x`` must be finite (the check would need a host round trip; NaN/Inf give unspecified
outputs), and for q8 values so must ``x`` times a scale be in float32. A CudaBuckets holds its own scratch, so one matrix is used by one stream at a time.
The kernel needs all its blocks resident at once: it is launched cooperative (at most one block
per multiprocessor), which the driver guarantees.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from pyeffort import _validate, reference
from pyeffort.dense import DenseQ8
from pyeffort._devices import GROUP_MAX, MatmulInfo
from pyeffort.errors import (
    STATUS_DEVICE,
    BackendError,
    DTypeError,
    LayoutError,
    ShapeError,
    status_error,
)

GROUP = reference.GROUP
VALUE_KINDS = ("f16", "q8")  # value kinds with kernels here (Buckets.to checks it)
_ROOT = pathlib.Path(__file__).resolve().parent
SOURCES = ("status.cu", "bucketmul.cu", "cluster.cu", "dense_q8.cu", "channel_skip.cu")  # as setup.py
_PDL = os.environ.get("PYEFFORT_CUDA_PDL", "1") != "0"
_COOP = os.environ.get("PYEFFORT_CUDA_COOP", "1") != "0"
KERNELS = ("coop", "cluster")  # the effort kernel's designs (set_kernel)
CLUSTER_MAX = 16  # blocks per cluster (the cluster kernel: a power of two)
TOLERANCE_MAX = 0.02  # of a call's multiplications (set_tolerance)


def _env_settings(env) -> tuple[str, float]:
    """PYEFFORT_CUDA_KERNEL and PYEFFORT_CUDA_TOLERANCE (set_kernel's and set_tolerance's
    defaults), checked: a misspelt kernel or an out-of-range tolerance raises, naming the
    variable, instead of running another kernel than the one asked for."""
    kernel = env.get("PYEFFORT_CUDA_KERNEL", "coop")
    if kernel not in KERNELS:
        raise ValueError(f"PYEFFORT_CUDA_KERNEL must be one of {KERNELS}, got {kernel!r}")
    raw = env.get("PYEFFORT_CUDA_TOLERANCE", "0")
    try:
        tol = float(raw)
    except ValueError:
        tol = float("nan")
    if not 0.0 <= tol <= TOLERANCE_MAX:
        raise ValueError(f"PYEFFORT_CUDA_TOLERANCE must lie in [0, {TOLERANCE_MAX}], got {raw!r}")
    return kernel, tol


_KERNEL, _TOL = _env_settings(os.environ)
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
        ("hist", ctypes.c_void_p),
        ("cand", ctypes.c_void_p),
        ("partial", ctypes.c_void_p),
        ("slot", ctypes.c_void_p),
        ("state", ctypes.c_void_p),
        ("n_in", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
        ("n_rows", ctypes.c_int64),
        ("ct", ctypes.c_int32),
        ("n_tiles", ctypes.c_int32),
        ("n_splits", ctypes.c_int32),
        ("block0", ctypes.c_int32),
        ("cand_seg", ctypes.c_int32),
        ("q8", ctypes.c_int32),
        ("total_w", ctypes.c_ulonglong),
    ]


class _Group(ctypes.Structure):
    """Mirror of pe_cuda_group in src/cuda/pe_cuda.h."""

    _fields_ = [
        ("m", _Matrix * GROUP_MAX),
        ("y", ctypes.c_void_p * GROUP_MAX),
        ("n_mat", ctypes.c_int32),
        ("n_workers", ctypes.c_int32),
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


def source_dir(root: pathlib.Path = _ROOT) -> pathlib.Path:
    """The folder of the CUDA sources for the package at ``root``: ``_cuda_src`` inside it (an
    installed wheel: setup.py's build_py copies them there), else ``src/cuda`` beside it (a
    source checkout)."""
    for cand in (root / "_cuda_src", root.parent / "src" / "cuda"):
        if all((cand / f).is_file() for f in SOURCES):
            return cand
    raise BackendError(
        f"pyeffort CUDA: the kernel sources are not in {root / '_cuda_src'} nor in "
        f"{root.parent / 'src' / 'cuda'} (reinstall pyeffort, or build with PYEFFORT_CUDA=1)"
    )


def source_files(root: pathlib.Path = _ROOT) -> list[pathlib.Path]:
    """Every CUDA source and header of the library (what its cache key hashes)."""
    d = source_dir(root)
    return sorted(f for f in d.iterdir() if f.suffix in (".cu", ".cuh", ".h"))


def nvcc_command(out: str, archs: list[str]) -> list[str]:
    """The nvcc command line that builds the kernel library."""
    sources = [str(source_dir() / f) for f in SOURCES]
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
    archs = _arch_flags()
    h = hashlib.sha256(" ".join(archs).encode())
    for f in source_files():
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
        prebuilt = pathlib.Path(os.environ.get("PYEFFORT_CUDA_LIB", _ROOT / "_pe_cuda.so"))
        _lib_handle = load(prebuilt if prebuilt.exists() else _compiled_path())
    return _lib_handle


def load(path) -> ctypes.CDLL:
    """The kernel library at ``path``, its functions typed and its kernels set up."""
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    group = ctypes.POINTER(_Group)
    lib.pe_cuda_matmul.argtypes = [group, p, i32, i64, p, f64, i32, i32, p, i32, i32]
    lib.pe_cuda_matmul_cluster.argtypes = [group, p, i32, i64, p, f64, i32, i32, p, i32, f64]
    lib.pe_cuda_max_clusters.argtypes = [i32, i32, ctypes.POINTER(ctypes.c_int)]
    lib.pe_cuda_dense_q8.argtypes = [p, i32, i64, p, p, i64, i64, i32, p, p, p, i32, p, i32]
    lib.pe_cuda_channel_skip.argtypes = [p, i32, i64, i64, p, i64, i64, i32, p, p, p, p, p, i32]
    lib.pe_cuda_channel_skip.argtypes += [p, i32]
    lib.pe_cuda_error_string.restype = ctypes.c_char_p
    lib.pe_cuda_error_string.argtypes = [i32]
    _check(lib, lib.pe_cuda_init())
    _check(lib, lib.pe_cuda_cluster_init())
    return lib


def _check(lib, status: int) -> None:
    """A status of the library (pe_cuda.h) -> the exception errors.status_error names."""
    if status:
        msg = lib.pe_cuda_error_string(status)  # a CUDA runtime error's own message, or NULL
        detail = f"{msg.decode()} (CUDA error {status - STATUS_DEVICE})" if msg else ""
        raise status_error(status, "pyeffort CUDA", detail)


def set_pdl(enabled: bool) -> None:
    """Launch with programmatic dependent launch: the kernel's prologue overlaps the previous
    kernel's end (default on; PYEFFORT_CUDA_PDL=0 turns it off)."""
    global _PDL
    _PDL = bool(enabled)


def set_coop(enabled: bool) -> None:
    """Launch cooperative (default on; PYEFFORT_CUDA_COOP=0 turns it off, for measurements only:
    the kernel then relies on having the GPU to itself to find all its blocks resident)."""
    global _COOP
    _COOP = bool(enabled)


def set_kernel(name: str) -> None:
    """The effort kernel of matrices and groups made from now on (default "coop", or
    $PYEFFORT_CUDA_KERNEL): "coop", one cooperative kernel whose blocks meet through global
    memory, or "cluster", thread block clusters that each find the cutoff and sum their splits
    in distributed shared memory (src/cuda/cluster.cu). A matrix keeps the kernel it was made
    for (its tile width is chosen for it)."""
    global _KERNEL
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    _KERNEL = name


def set_tolerance(tol: float) -> None:
    """How far the cluster kernel's selection may land from the budget, as a fraction of the
    matrix's multiplications (0 to TOLERANCE_MAX; default 0, or $PYEFFORT_CUDA_TOLERANCE: the
    exact cutoff of reference.py).
    With tol > 0, when the histogram bin holding the cut (1/16 of an octave of keys) weighs at
    most 2 * tol, that bin is taken whole or not at all, whichever is nearer the budget: no
    finer search, so a shorter fixed cost. The realised effort is still reported exactly. Read
    at each launch (a captured graph keeps the value it was captured with)."""
    global _TOL
    if not 0.0 <= tol <= TOLERANCE_MAX:
        raise ValueError(f"tolerance must lie in [0, {TOLERANCE_MAX}], got {tol}")
    _TOL = float(tol)


def cluster_size(tiles: int, n_sms: int, fits=None) -> int:
    """Blocks per cluster for `tiles` column tiles: the largest power of two up to CLUSTER_MAX
    with tiles * size <= n_sms and, given fits(size) (the clusters the device holds at once:
    cluster_fits), all tiles in one wave (at least 1; more tiles than that run in waves)."""
    c = 1
    while c < CLUSTER_MAX and tiles * c * 2 <= n_sms and (fits is None or tiles <= fits(c * 2)):
        c *= 2
    return c


def _cluster_ct(g: int, n_sms: int, fits=None) -> int:
    """The tile width of the cluster kernel for g groups of 16 outputs: most blocks in one wave
    (tiles * cluster_size), then the least padding (streamed too), then the widest tile.
    fits(size, ct): cluster_fits' count, or None (every cluster of n_sms blocks fits)."""
    pad = lambda ct: -(-g // ct) * ct - g  # noqa: E731
    return max((256, 128, 64, 32), key=lambda ct: (_blocks(g, ct, n_sms, fits), -pad(ct), ct))


def default_ct(g: int, device) -> int:
    """The tile width of a matrix of g groups of 16 outputs on `device` for the current kernel."""
    n_sms = num_sms(device)
    if _KERNEL == "cluster":
        return _cluster_ct(g, n_sms, cluster_fits(device))
    return _coop_ct(g, n_sms)


def _coop_ct(g: int, n_sms: int) -> int:
    ct = 128 if g >= 256 else 64 if g >= 128 else 32
    return 256 if -(-g // ct) + 1 > n_sms else ct  # one block per tile must fit: wider tiles


def _blocks(g: int, ct: int, n_sms: int, fits=None) -> int:
    tiles = -(-g // ct)
    per = None if fits is None else (lambda c: fits(c, ct))  # noqa: E731
    return tiles * cluster_size(tiles, n_sms, per) if tiles <= n_sms else 0


_fits_cache: dict = {}


def cluster_fits(device):
    """fits(size, ct) -> the clusters of `size` blocks of tile width ct that `device` holds at
    once (pe_cuda_max_clusters: the GPC boundaries counted); cached."""
    torch, lib = _torch(), _lib()

    def fits(c: int, ct: int) -> int:
        key = (str(device), c, ct)
        if key not in _fits_cache:
            n = ctypes.c_int(0)
            with torch.cuda.device(device):
                _check(lib, lib.pe_cuda_max_clusters(c, ct, ctypes.byref(n)))
            _fits_cache[key] = n.value
        return _fits_cache[key]

    return fits


def num_sms(device) -> int:
    return _torch().cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------- buckets on the device


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_code(torch, dt) -> int:
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if dt not in codes:
        raise DTypeError(f"CUDA tensors must be float16, bfloat16 or float32, got {dt}")
    return codes[dt]


class CudaBuckets:
    """A Buckets resident on a CUDA device, repacked for the GPU kernels (see module doc).

    ``ct``: groups per column tile (32, 64, 128 or 256; by default from the width). Matrices run
    together in a CudaGroup need the same ``ct``. ``splits``: row splits when used alone (by
    default as many as fill the multiprocessors). ``scales``: the q8 scales of int8 ``values``
    (reference.py; None for fp16 values)."""

    backend = "cuda"  # the device backend pyeffort.matmul dispatches to (pyeffort._devices)

    def __init__(
        self,
        values,
        positions,
        stats,
        order,
        n_out: int,
        device=None,
        *,
        ct=None,
        splits=None,
        scales=None,
    ):
        torch = _torch()
        dev = torch.device(device if device is not None else "cuda")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        # Buckets' arrays are read-only views: copied to the device, so a writable host copy
        # (np.require) only where torch would warn about sharing read-only memory
        as_t = lambda a: (
            a if torch.is_tensor(a) else torch.as_tensor(np.require(a, requirements="W"))
        )
        values, positions = as_t(values).to(dev), as_t(positions).to(dev)
        stats, order = as_t(stats).to(dev), as_t(order).to(dev)
        scales = None if scales is None else as_t(scales).to(dev)
        self.device, self.n_out = dev, int(n_out)
        self.n_in, self.n_rows = int(stats.shape[1]), int(values.shape[0])
        self.n_groups = reference.n_groups(self.n_out)
        g = self.n_groups
        if values.shape != (self.n_rows, g) or positions.shape != (self.n_rows, (g + 1) // 2):
            raise ShapeError("values/positions do not match the matrix shape")
        self.values_kind = "f16" if scales is None else "q8"
        _check_kind(torch, values, scales, self.n_rows, self.n_in, g)
        if self.n_in * self.n_out >= 2**32:
            raise ShapeError("the CUDA kernels take matrices of fewer than 2**32 weights")
        self.kernel = _KERNEL
        ct = default_ct(g, dev) if ct is None else ct
        if ct not in (32, 64, 128, 256):
            raise ShapeError(f"ct must be 32, 64, 128 or 256, got {ct}")
        with torch.cuda.device(dev):
            self._setup(torch, values, positions, stats, order, int(ct), scales)
        self._alone = CudaGroup([self], splits=splits)

    def _setup(self, torch, values, positions, stats, order, ct, scales):
        g, n_rows, dev = self.n_groups, self.n_rows, self.device
        self.ct, self.n_tiles = ct, -(-g // ct)
        self._slot = None  # q8: (n_rows,) int32, 4 * record + chunk of each row
        self.n_scales = 0 if scales is None else int(scales.numel())
        if scales is None:
            self.wt = repack(torch, values, positions, ct)  # (n_tiles, n_rows, 5 ct / 2) u8
        else:  # (n_tiles, n_records, 13 ct / 2) u8
            self.wt, self._slot = repack_q8(torch, values, positions, scales, stats, order, ct)
        self.order = order.reshape(-1)[:n_rows].to(torch.int32).contiguous()  # (n_rows,)
        self.stats = stats.reshape(-1)[:n_rows].to(torch.float32).contiguous()  # (n_rows,)
        i32 = {"dtype": torch.int32, "device": dev}
        self._hist = torch.zeros(2 * 4096, **i32)  # level-1 histograms, by call parity
        self._state = torch.zeros(8, dtype=torch.int64, device=dev)  # pe_cuda_state
        mults = np.repeat(reference.row_mults(self.n_out), self.n_in)[:n_rows]
        self.total_w = int(mults.sum())

    def _matrix(self, partial, cand, cand_seg: int, n_splits: int, block0: int) -> _Matrix:
        return _Matrix(
            self.wt.data_ptr(),
            self.order.data_ptr(),
            self.stats.data_ptr(),
            self._hist.data_ptr(),
            cand.data_ptr(),
            partial.data_ptr(),
            None if self._slot is None else self._slot.data_ptr(),
            self._state.data_ptr(),
            self.n_in,
            self.n_out,
            self.n_rows,
            self.ct,
            self.n_tiles,
            n_splits,
            block0,
            cand_seg,
            int(self._slot is not None),
            self.total_w,
        )

    @property
    def n_splits(self) -> int:
        return self._alone.splits[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out)

    @property
    def loaded_fraction(self) -> float:
        return self.total_w / (self.n_in * self.n_out)

    @property
    def nbytes(self) -> int:
        """Bytes of the bucket rows held on the device (canonical count, without tile padding),
        q8 scales included."""
        return self.n_rows * reference.row_bytes(self.n_groups, self._slot is not None) + (
            2 * self.n_scales
        )

    def bytes_read(self, rows: int, records: int) -> int:
        """Weight bytes of `rows` dispatched rows and (q8) `records` dispatched records (a tier of
        an input: its scales), as reference.bucketmul counts them."""
        q8 = self._slot is not None
        extra = 2 * reference.n_chunks(self.n_groups) * records if q8 else 0
        return rows * reference.row_bytes(self.n_groups, q8) + extra

    def __repr__(self) -> str:
        return (
            f"CudaBuckets(n_in={self.n_in}, n_out={self.n_out}, values={self.values_kind!r}, "
            f"loaded_fraction={self.loaded_fraction:.3f}, device={self.device})"
        )


class CudaGroup:
    """Up to GROUP_MAX (4) CudaBuckets with the same input size, ``ct`` and value kind (the
    kernel is compiled per kind: a group of fp16 and q8 matrices is refused), run by one kernel
    per call (``matmul_group``): e.g. q/k/v, or w1/w3. Each keeps its own cutoff. The group
    holds the split partial sums; the matrices' own scratch is shared with their single calls,
    so a matrix is used by one call at a time."""

    backend = "cuda"

    def __init__(self, mats, splits=None):
        torch = _torch()
        mats = list(mats)
        if not 1 <= len(mats) <= GROUP_MAX:
            raise ShapeError(f"a CudaGroup takes 1 to {GROUP_MAX} CudaBuckets, got {len(mats)}")
        if not all(isinstance(b, CudaBuckets) for b in mats):
            raise DTypeError("a CudaGroup takes CudaBuckets (B.to('cuda'))")
        b0 = mats[0]
        for b in mats:
            if b.device != b0.device or b.n_in != b0.n_in or b.ct != b0.ct:
                raise ShapeError("a CudaGroup needs one device, one n_in and one ct")
            if b.values_kind != b0.values_kind:
                raise ShapeError("a CudaGroup needs one value kind (all f16 or all q8)")
        if len({id(b) for b in mats}) != len(mats):
            raise ShapeError("a matrix appears twice in a CudaGroup")
        if len({b.kernel for b in mats}) != 1:
            raise ShapeError("a CudaGroup needs one kernel (set_kernel before B.to('cuda'))")
        self.kernel = b0.kernel
        self.mats, self.device = mats, b0.device
        self._g = _Group()
        if self.kernel == "cluster":
            self._cluster_layout(torch, splits)
            return
        n_sms = num_sms(b0.device)
        tiles = sum(b.n_tiles for b in mats)
        if tiles + len(mats) > n_sms:
            raise ShapeError(f"too many column tiles ({tiles}) for {n_sms} multiprocessors")
        if splits is None:
            splits = max(1, (n_sms - len(mats)) // tiles)
        elif not 1 <= splits <= (n_sms - len(mats)) // tiles:
            raise ShapeError(f"splits must lie in 1..{(n_sms - len(mats)) // tiles}")
        self.splits = [min(int(splits), -(-b.n_rows // 32)) for b in mats]
        self._scratch, block0 = [], 0
        for i, (b, sp) in enumerate(zip(mats, self.splits)):
            # split sums: tagged words (tag << 32 | float bits); zeroed, so no stale tag matches
            n_part = sp * b.n_tiles * 16 * b.ct if sp > 1 else 1
            part = torch.zeros(n_part, dtype=torch.int64, device=b.device)
            # candidates: per worker a tagged 64-bit count and at most its share of its split's
            # rows as tagged 64-bit keys (pe_cand_stride: 2 seg + 2 words; older builds read
            # seg + 2 words, rounded up to even, of the same space)
            split_rows = 32 * _ceil_div(_ceil_div(b.n_rows, 32), sp)
            seg = _ceil_div(split_rows, b.n_tiles)
            cand = torch.zeros(b.n_tiles * sp * (2 * seg + 4), dtype=torch.int32, device=b.device)
            self._scratch += [part, cand]
            self._g.m[i] = b._matrix(part, cand, seg, sp, block0)
            block0 += b.n_tiles * sp
        self._g.n_mat, self._g.n_workers = len(mats), block0

    def _cluster_layout(self, torch, splits):
        """The cluster kernel's blocks: one cluster of C blocks (the splits) per column tile,
        C the same for every matrix (cluster_size of all the tiles, or `splits`)."""
        tiles = sum(b.n_tiles for b in self.mats)
        if splits is None:
            fits = cluster_fits(self.device)
            ct = self.mats[0].ct
            splits = cluster_size(tiles, num_sms(self.device), lambda c: fits(c, ct))
        elif splits not in (1, 2, 4, 8, 16):
            raise ShapeError(f"splits of the cluster kernel must be 1, 2, 4, 8 or 16, got {splits}")
        self.splits = [int(splits)] * len(self.mats)
        unused = torch.zeros(2, dtype=torch.int64, device=self.device)  # hist/cand/partial
        self._scratch, block0 = [unused], 0
        for i, b in enumerate(self.mats):
            self._g.m[i] = b._matrix(unused, unused, 0, int(splits), block0)
            block0 += b.n_tiles * int(splits)
        self._g.n_mat, self._g.n_workers = len(self.mats), block0


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


def _check_kind(torch, values, scales, n_rows: int, n_in: int, g: int) -> None:
    """fp16 values without scales, or int8 values with fp16 scales of reference.py's shape."""
    if scales is None:
        if values.dtype not in (torch.float16, torch.int16, torch.uint16):
            raise DTypeError(f"values without scales must be float16, got {values.dtype}")
        return
    if values.dtype != torch.int8 or scales.dtype != torch.float16:
        raise DTypeError(
            f"q8 needs int8 values and float16 scales, got {values.dtype}, {scales.dtype}"
        )
    want = (reference.scale_rows(n_rows, n_in), reference.n_chunks(g))
    if tuple(scales.shape) != want:
        raise ShapeError(f"scales must have shape {want}, got {tuple(scales.shape)}")


def repack_q8(torch, values, positions, scales, stats, order, ct: int):
    """q8 canonical rows -> (wt (n_tiles, n_records, 13 ct / 2) u8, slot (n_rows,) i32).

    Record i is row i of ``scales`` (one tier of one input, reference.py): for each column tile
    its ct / 4 fp16 scales, then 4 chunks of ct int8 values and ct / 2 nibble bytes. Row r is
    chunk slot[r] % 4 of record slot[r] // 4; a record's chunks hold its loaded rows by statistic,
    largest first (ties: lower rank first), so chunk 0 is dispatched whenever any row of the
    record is (src/cuda/pe_cuda.h)."""
    n_rows, g = values.shape
    n_in, dev = order.shape[1], values.device
    n_tiles, n_rec = -(-g // ct), scales.shape[0]
    gp = n_tiles * ct
    ranks = torch.arange(reference.N_RANKS, device=dev)
    order = order.to(torch.int64)
    place = torch.empty((reference.N_RANKS // reference.TIER, n_in), dtype=torch.int64, device=dev)
    for t in range(place.shape[0]):  # place[t, i]: the record of tier t of input i
        place[t, order[reference.TIER * t]] = t * n_in + torch.arange(n_in, device=dev)
    rec = place[(ranks // reference.TIER)[:, None], order].reshape(-1)[:n_rows]
    sub = (torch.arange(n_rows, device=dev) // n_in) % reference.TIER  # rank in the tier
    st = stats.reshape(-1)[:n_rows].to(torch.float32)
    by_rec = torch.full((n_rec, reference.TIER), -1.0, device=dev)  # stats >= 0; -1: not loaded
    by_rec[rec, sub] = st
    other = by_rec[rec]  # (n_rows, 4): the statistics of the row's record
    lower = torch.arange(reference.TIER, device=dev)[None, :] < sub[:, None]
    before = (other > st[:, None]) | ((other == st[:, None]) & lower)
    slot = reference.TIER * rec + before.sum(1)
    v = torch.zeros((reference.TIER * n_rec, gp), dtype=torch.uint8, device=dev)
    v[slot, :g] = values.view(torch.uint8)
    p = torch.zeros((reference.TIER * n_rec, gp // 2), dtype=torch.uint8, device=dev)
    p[slot, : positions.shape[1]] = positions
    chunks = torch.cat([v.view(-1, n_tiles, ct), p.view(-1, n_tiles, ct // 2)], dim=2)
    chunks = chunks.view(n_rec, reference.TIER, n_tiles, 3 * ct // 2).permute(2, 0, 1, 3)
    sc = torch.zeros((n_rec, gp // reference.CHUNK), dtype=torch.float16, device=dev)
    sc[:, : scales.shape[1]] = scales
    sc = sc.view(torch.uint8).view(n_rec, n_tiles, ct // 2).permute(1, 0, 2)
    wt = torch.cat([sc, chunks.reshape(n_tiles, n_rec, 6 * ct)], dim=2).contiguous()
    return wt, slot.to(torch.int32).contiguous()


def to_device(b, device="cuda", **kw):
    """A host Buckets -> CudaBuckets on ``device`` (kw: ct, splits); a DenseQ8 (pyeffort.dense)
    -> CudaDenseQ8 (kw: splits)."""
    if isinstance(b, DenseQ8):
        return CudaDenseQ8(b, device, **kw)
    return CudaBuckets(
        b.values, b.positions, b.stats, b.order, b.n_out, device, scales=b.scales, **kw
    )


def build_buckets(W, out_weight=None, values: str = "f16", **kw) -> CudaBuckets:
    """reference.build on the GPU: W (n_in, n_out) CUDA tensor (float16/bfloat16/float32) ->
    CudaBuckets, with no host copy. Same buckets as the CPU builder (checked by tests/test_cuda
    and, on CPU tensors, by tests/test_out_weight), ``out_weight`` and ``values`` ("f16" or
    "q8": quantised by quantise_q8) as in ``pyeffort.build_buckets`` (out_weight a numpy array
    or a tensor, (n_out,))."""
    torch = _torch()
    if not torch.is_tensor(W) or not W.is_cuda or W.ndim != 2:
        raise DTypeError("cuda.build_buckets takes a 2-D CUDA tensor (n_in, n_out)")
    if W.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DTypeError(f"W must be float16, bfloat16 or float32, got {W.dtype}")
    if values not in VALUE_KINDS:
        raise ValueError(f"values must be one of {VALUE_KINDS}, got {values!r}")
    with torch.cuda.device(W.device):
        vals, positions, stats, order = build_canonical(W, out_weight)
        scales = None
        if values == "q8":
            vals, scales = quantise_q8(vals, order)
        return CudaBuckets(vals, positions, stats, order, W.shape[1], W.device, scales=scales, **kw)


def quantise_q8(values, order):
    """reference.quantise_q8 in torch, on the tensors' device, bit for bit: fp16 bucket rows
    (16 n_in, G) and order (16, n_in) -> (int8 rows, fp16 scales (4 n_in, ceil(G / 4)))."""
    torch = _torch()
    n_in, (rows, g), dev = order.shape[1], values.shape, values.device
    nc, tier, chunk = reference.n_chunks(g), reference.TIER, reference.CHUNK
    order = order.to(torch.int64)
    ranks = torch.arange(reference.N_RANKS, device=dev)[:, None]
    place = torch.empty((reference.N_RANKS, n_in), dtype=torch.int64, device=dev)
    place[ranks.expand(-1, n_in), order] = torch.arange(n_in, device=dev).expand(
        reference.N_RANKS, -1
    )  # place[k, i]: input i's row in rank k
    q = torch.empty((rows, g), dtype=torch.int8, device=dev)
    scales = torch.empty((reference.N_RANKS // tier * n_in, nc), dtype=torch.float16, device=dev)
    w = torch.zeros((tier, n_in, nc * chunk), dtype=torch.float32, device=dev)
    for t in range(reference.N_RANKS // tier):
        ks = range(tier * t, tier * t + tier)
        for r, k in enumerate(ks):  # the tier's rows in the order of its first rank
            w[r, :, :g] = values[k * n_in + place[k, order[tier * t]]].to(torch.float32)
        w4 = w.view(tier, n_in, nc, chunk)
        m = w4.abs().amax(dim=(0, 3))  # (n_in, nc)
        s16 = (m / 127.0).to(torch.float16)  # reference.q8_scale: raised where 127 s < m
        short = s16.to(torch.float32) * 127.0 < m
        s16 = torch.where(short, (s16.view(torch.int16) + 1).view(torch.float16), s16)
        scales[t * n_in : (t + 1) * n_in] = s16
        s = s16.to(torch.float32)
        s[s == 0] = 1  # a block of zeros: q = 0
        qt = torch.clamp(torch.round(w4 / s[None, :, :, None]), -127, 127).to(torch.int8)
        qt = qt.view(tier, n_in, nc * chunk)
        for r, k in enumerate(ks):  # back to rank k's own row order
            q[k * n_in : (k + 1) * n_in] = qt[r, place[tier * t, order[k]], :g]
    return q, scales


def build_canonical(W, out_weight=None):
    """W (n_in, n_out) torch tensor -> canonical (values, positions, stats, order) tensors on
    its device; with ``out_weight`` the ranks and statistics follow fp16(a_j * w_ij) and the
    values stay the true weights (``pyeffort.build_buckets``)."""
    torch = _torch()
    n_in, n_out = W.shape
    g = reference.n_groups(n_out)
    w16 = W.to(torch.float16)
    if not torch.isfinite(w16).all():
        from pyeffort.errors import NonFiniteError

        raise NonFiniteError("W holds NaN or Inf (or values beyond the float16 range)")
    rank16 = w16  # what the ranks and statistics follow
    if out_weight is not None:
        if torch.is_tensor(out_weight):
            out_weight = out_weight.detach().cpu().numpy()
        a = torch.as_tensor(_validate.out_weight(out_weight, n_out), device=W.device)
        rank16 = (w16.to(torch.float32) * a).to(torch.float16)
        if not torch.isfinite(rank16).all():
            raise ValueError("out_weight * W overflows float16 (scale out_weight down)")

    def grouped(a16):  # (n_in, n_out) -> (n_in, g, 16), the last group padded with zeros
        padded = torch.zeros((n_in, g * GROUP), dtype=torch.float16, device=W.device)
        padded[:, :n_out] = a16
        return padded.view(n_in, g, GROUP)

    padded = grouped(w16)
    ranked = padded if rank16 is w16 else grouped(rank16)
    key = ranked.view(torch.int16).to(torch.int32) & 0x7FFF
    rank_to_pos = torch.sort(-key, dim=-1, stable=True).indices  # (n_in, g, 16)
    vals = torch.gather(padded, -1, rank_to_pos).permute(2, 0, 1)  # (16, n_in, g)
    rvals = vals if rank16 is w16 else torch.gather(ranked, -1, rank_to_pos).permute(2, 0, 1)
    pos = rank_to_pos.permute(2, 0, 1).to(torch.uint8)
    m = torch.as_tensor(np.maximum(reference.row_mults(n_out), 1), device=W.device)
    v64 = rvals.to(torch.float64)
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
    if not isinstance(B, CudaBuckets):
        raise DTypeError("CUDA activations need a CudaBuckets: use B.to('cuda')")
    outs = None if out is None else [out]
    res = _run(x, B._alone, effort, outs, out_dtype, return_info)
    if not return_info:
        return res[0]
    ys, infos = res
    return ys[0], infos[0]


def matmul_group(x, group, effort=1.0, *, outs=None, return_info: bool = False, out_dtype=None):
    """``[x @ W for W in group]`` in one kernel launch per token; each matrix at its effort with
    its own cutoff (the same results as separate ``matmul`` calls). ``group``: a CudaGroup (or
    a list of CudaBuckets, grouped on the fly). ``effort``: one for all (a float, or a
    one-element float64 CUDA tensor) or one per matrix: a float64 CUDA tensor ``(len(group),)``
    (read by the kernel, so a CUDA graph follows its changes), or a list of floats (eager use:
    copied to the device per call unless all equal). Returns a list (and a list of MatmulInfo)."""
    if not isinstance(group, CudaGroup):
        group = CudaGroup(group)
    if outs is not None and len(outs) != len(group.mats):
        raise ShapeError(f"outs must hold {len(group.mats)} tensors")
    return _run(x, group, effort, outs, out_dtype, return_info)


def _run(x, group, effort, outs, out_dtype, return_info):
    torch = _torch()
    B0 = group.mats[0]
    if not is_cuda_tensor(x) or x.device != B0.device:
        raise DTypeError(f"x must be a CUDA tensor on {B0.device}")
    xd = _dtype_code(torch, x.dtype)
    if x.ndim not in (1, 2) or x.shape[-1] != B0.n_in:
        raise ShapeError(
            f"x must have shape ({B0.n_in},) or (n_tokens, {B0.n_in}), got {tuple(x.shape)}"
        )
    if not x.is_contiguous():
        raise LayoutError("x must be contiguous")
    n_tok = 1 if x.ndim == 1 else int(x.shape[0])
    eff_ptr, eff_val, eff_each, _keep = _effort(torch, effort, len(group.mats), B0.device)
    ys = []
    for i, B in enumerate(group.mats):
        shape = (B.n_out,) if x.ndim == 1 else (n_tok, B.n_out)
        o = None if outs is None else outs[i]
        ys.append(_output(torch, o, out_dtype, x.dtype, shape, B.device))
    if len({y.dtype for y in ys}) != 1:
        raise DTypeError("the outputs of a group need one dtype")
    if outs is not None and _any_overlap([x, *ys]):
        raise LayoutError("an output shares memory with x or another output: pass separate tensors")
    lib = _lib()
    if return_info:
        for B in group.mats:
            B._state[5:8].zero_()  # info_mults, info_rows, info_records
    g = group._g
    for i, y in enumerate(ys):
        g.y[i] = y.data_ptr()
    stream = torch.cuda.current_stream(B0.device).cuda_stream
    args = (ctypes.byref(g), x.data_ptr(), xd, n_tok, eff_ptr, eff_val, eff_each)
    args += (_dtype_code(torch, ys[0].dtype), stream, int(_PDL))
    with torch.cuda.device(B0.device):
        if group.kernel == "cluster":
            _check(lib, lib.pe_cuda_matmul_cluster(*args, _TOL))
        else:
            _check(lib, lib.pe_cuda_matmul(*args, int(_COOP)))
    if not return_info:
        return ys
    infos = []
    for B in group.mats:
        mults, rows, records = (int(v) for v in B._state[5:8].cpu())
        total = max(n_tok, 1) * B.n_in * B.n_out
        infos.append(MatmulInfo(mults / total, B.bytes_read(rows, records), mults))
    return ys, infos


def _effort(torch, effort, n: int, device):
    """The effort of a call of n matrices -> (device pointer or None, value, effort_each, the
    tensor the pointer is of: kept until the launch)."""
    if torch.is_tensor(effort):
        if effort.dtype != torch.float64 or effort.device != device:
            raise DTypeError(f"a tensor effort must be float64 on {device}, got {effort.dtype} "
                             f"on {effort.device}")  # fmt: skip
        if effort.numel() != 1 and (effort.ndim != 1 or effort.numel() != n):
            raise ShapeError(f"a tensor effort holds one effort or one per matrix ({n},), got "
                             f"shape {tuple(effort.shape)}")  # fmt: skip
        if not effort.is_contiguous():
            raise LayoutError("a tensor effort must be contiguous")
        return effort.data_ptr(), 0.0, int(effort.numel() != 1), effort
    if not isinstance(effort, (list, tuple, np.ndarray)):
        return None, _validate.effort(effort), 0, None
    if isinstance(effort, np.ndarray) and effort.ndim != 1:
        raise ShapeError(f"an array of efforts must be 1-D, got shape {effort.shape}")
    efforts = [_validate.effort(e) for e in effort]
    if len(efforts) != n:
        raise ShapeError(f"{len(efforts)} efforts for {n} matrices")
    if len(set(efforts)) == 1:
        return None, efforts[0], 0, None
    t = torch.tensor(efforts, dtype=torch.float64).to(device)
    return t.data_ptr(), 0.0, 1, t


def _any_overlap(tensors) -> bool:
    """Whether two of these contiguous tensors share bytes (the kernel reads x while it writes
    the outputs)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()
    )
    return any(b0 < a1 for (_, a1), (b0, _) in itertools.pairwise(spans))  # sorted: neighbours


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


# ---------------------------------------------------------------- dense baselines on the GPU
# The kernels an effort matmul is judged against on the same GPU (src/cuda/dense_q8.cu,
# channel_skip.cu): our dense 8-bit weight-only GEMV and TEAL-style channel skipping. Both sum
# in a fixed order (split-K partials added in split order): the same bits every call. Their
# scratch is reused by every call, so a matrix (and a shape, for channel skipping) is used by one
# stream at a time.

DENSE_COLS = 256  # output columns per block of both dense kernels (splitk.cuh's tiles)
_BLOCKS_PER_SM = {"q8": 3, "rows": 2}  # resident blocks of 256 threads (80 / 100 registers)


def dense_splits(n_out: int, units: int, per_split: int, n_sms: int, kind: str) -> int:
    """Input splits of a dense kernel: as many as fill one wave of blocks (tiles x splits), each
    split keeping at least ``per_split`` of the ``units`` (q8: scale blocks of 32 inputs;
    channel skipping: kept rows)."""
    tiles = _ceil_div(n_out, DENSE_COLS)
    wave = _BLOCKS_PER_SM[kind] * n_sms
    return max(1, min(wave // tiles, units // per_split))


def keep_count(keep, n_in: int) -> int:
    """Rows channel skipping keeps: ``round(keep * n_in)``, as pyeffort.eval's ``teal`` rule."""
    return round(_validate.effort(keep, "keep") * n_in)


def _splitk_scratch(torch, n_split: int, n_out: int, device):
    """(partial (n_split, n_out) f32, count (tiles,) i32 zeroed) of splitk.cuh."""
    partial = torch.empty((n_split, n_out), dtype=torch.float32, device=device)
    count = torch.zeros(_ceil_div(n_out, DENSE_COLS), dtype=torch.int32, device=device)
    return partial, count


class CudaDenseQ8:
    """A DenseQ8 (pyeffort.dense: int8 weights, an fp16 scale per 32 inputs of each output)
    resident on a CUDA device, for ``dense_q8_matmul``. ``splits``: input splits (default
    ``dense_splits``)."""

    def __init__(self, wq: DenseQ8, device="cuda", *, splits=None):
        torch = _torch()
        if not isinstance(wq, DenseQ8):
            raise DTypeError(f"CudaDenseQ8 takes a pyeffort.DenseQ8, got {type(wq).__name__}")
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.n_in, self.n_out = wq.shape
        self.q = torch.as_tensor(np.require(wq.q, requirements="W")).to(dev)
        self.scales = torch.as_tensor(np.require(wq.scales, requirements="W").view(np.int16)).to(dev)
        nb = self.scales.shape[0]
        if splits is None:
            splits = dense_splits(self.n_out, nb, 8, num_sms(dev), "q8")
        if not 1 <= splits <= nb:
            raise ShapeError(f"splits must lie in 1..{nb}, got {splits}")
        self.splits = int(splits)
        self._partial, self._count = _splitk_scratch(torch, self.splits, self.n_out, dev)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: the int8 weights and the fp16 scales."""
        return self.q.numel() + 2 * self.scales.numel()

    def __repr__(self) -> str:
        return f"CudaDenseQ8(shape={self.shape}, splits={self.splits}, device={self.device})"


def _dense_io(torch, x, n_in: int, n_outs, device, out, out_dtype):
    """Checks x (n_in,) or (n_tokens, n_in) on ``device`` -> (x dtype code, n_tokens, y)."""
    if not is_cuda_tensor(x) or x.device != device:
        raise DTypeError(f"x must be a CUDA tensor on {device}")
    xd = _dtype_code(torch, x.dtype)
    if x.ndim not in (1, 2) or x.shape[-1] != n_in:
        raise ShapeError(f"x must have shape ({n_in},) or (n_tokens, {n_in}), got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise LayoutError("x must be contiguous")
    n_tok = 1 if x.ndim == 1 else int(x.shape[0])
    shape = (n_outs,) if x.ndim == 1 else (n_tok, n_outs)
    y = _output(torch, out, out_dtype, x.dtype, shape, device)
    if out is not None and _any_overlap([x, y]):
        raise LayoutError("out shares memory with x: pass a separate tensor")
    return xd, n_tok, y


def dense_q8_matmul(x, Wq, *, out=None, out_dtype=None):
    """``x @ W`` on the GPU for a CudaDenseQ8 (``cuda.to_device(pyeffort.quantize_dense_q8(W))``):
    float32 accumulation, the same result as ``pyeffort.dense_matmul`` up to summation order.
    ``x``: CUDA tensor ``(n_in,)`` or ``(n_tokens, n_in)``, float16/bfloat16/float32. Returns
    float32 (or ``out_dtype``: float32 or x's dtype)."""
    torch = _torch()
    if not isinstance(Wq, CudaDenseQ8):
        raise DTypeError("dense_q8_matmul takes a CudaDenseQ8: cuda.to_device(DenseQ8)")
    xd, n_tok, y = _dense_io(torch, x, Wq.n_in, Wq.n_out, Wq.device, out, out_dtype)
    lib = _lib()
    with torch.cuda.device(Wq.device):
        stream = torch.cuda.current_stream(Wq.device).cuda_stream
        _check(
            lib,
            lib.pe_cuda_dense_q8(
                x.data_ptr(), xd, n_tok, Wq.q.data_ptr(), Wq.scales.data_ptr(), Wq.n_in,
                Wq.n_out, Wq.splits, Wq._partial.data_ptr(), Wq._count.data_ptr(), y.data_ptr(),
                _dtype_code(torch, y.dtype), stream, int(_PDL),
            ),
        )  # fmt: skip
    return y


_skip_scratch: dict = {}  # (device, n_in, n_out, k, splits) -> (rows, xs, partial, count)


def channel_skip_matmul(x, W16, keep, *, out=None, out_dtype=None, splits=None):
    """TEAL-style channel skipping on the GPU: per token the ``keep_count(keep, n_in)`` input
    rows of largest ``|x_i|`` (ties: lower index first, an exact count selected on the device),
    ``y = sum x_i W16[i, :]`` over them, reading only the kept rows of ``W16`` ``(n_in, n_out)``
    (a contiguous float16 CUDA tensor, row-major). ``x`` and the result as ``dense_q8_matmul``'s.
    ``splits``: input splits of the product (default ``dense_splits``)."""
    torch = _torch()
    if not is_cuda_tensor(W16) or W16.dtype != torch.float16 or W16.ndim != 2:
        raise DTypeError("W16 must be a 2-D float16 CUDA tensor (n_in, n_out)")
    if not W16.is_contiguous():
        raise LayoutError("W16 must be contiguous (row-major)")
    n_in, n_out = W16.shape
    xd, n_tok, y = _dense_io(torch, x, n_in, n_out, W16.device, out, out_dtype)
    k = keep_count(keep, n_in)
    if splits is None:
        splits = dense_splits(n_out, k, 64, num_sms(W16.device), "rows")
    if not 1 <= splits <= max(1, k):
        raise ShapeError(f"splits must lie in 1..{max(1, k)}, got {splits}")
    key = (W16.device, n_in, n_out, k, int(splits))
    if key not in _skip_scratch:
        i32 = {"dtype": torch.int32, "device": W16.device}
        rows = torch.empty(max(k, 1), **i32)
        xs = torch.empty(max(k, 1), dtype=torch.float32, device=W16.device)
        _skip_scratch[key] = (rows, xs, *_splitk_scratch(torch, int(splits), n_out, W16.device))
    rows, xs, partial, count = _skip_scratch[key]
    lib = _lib()
    with torch.cuda.device(W16.device):
        stream = torch.cuda.current_stream(W16.device).cuda_stream
        _check(
            lib,
            lib.pe_cuda_channel_skip(
                x.data_ptr(), xd, n_tok, k, W16.data_ptr(), n_in, n_out, int(splits),
                rows.data_ptr(), xs.data_ptr(), partial.data_ptr(), count.data_ptr(),
                y.data_ptr(), _dtype_code(torch, y.dtype), stream, int(_PDL),
            ),
        )  # fmt: skip
    return y
