"""The public functions: effort matmul, the dense baseline, runtime information."""

from __future__ import annotations

import numpy as np

from pyeffort import _backend, _devices, _validate, dense
from pyeffort._devices import GROUP_MAX, MatmulInfo
from pyeffort.buckets import Buckets, build_buckets
from pyeffort.dense import DenseQ8
from pyeffort.errors import DTypeError, LayoutError, ShapeError


def matmul(x, W, effort: float = 1.0, *, out=None, return_info: bool = False):
    """``x @ W`` doing only a fraction ``effort`` of the multiplications, the largest ones.

    ``x``: ``(n_in,)`` or ``(n_tokens, n_in)``, float16 or float32, C-contiguous, finite.
    ``W``: a Buckets, or an ndarray ``(n_in, n_out)`` bucketed on the fly (slow: build once).
    Returns float32 ``(n_out,)`` or ``(n_tokens, n_out)``; with ``return_info`` also a MatmulInfo.
    Each token chooses its own cutoff. ``effort=1.0`` is the full product.

    >>> import numpy as np, pyeffort
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((512, 256)).astype(np.float16)
    >>> x = rng.standard_normal(512).astype(np.float32)
    >>> B = pyeffort.build_buckets(W)
    >>> y, info = pyeffort.matmul(x, B, effort=0.25, return_info=True)
    >>> y.shape, round(info.effort, 2)
    ((256,), 0.25)
    >>> exact = x @ W.astype(np.float32)
    >>> bool(np.dot(y, exact) / np.linalg.norm(y) / np.linalg.norm(exact) > 0.9)
    True
    """
    device = _devices.backend_of(W)
    if device is not None:  # a matrix on a device (W.to("cuda")): that backend's kernels
        return device.matmul(x, W, effort, out=out, return_info=return_info)
    _host_activations(x)
    if not isinstance(W, Buckets):
        if not isinstance(W, np.ndarray) and not hasattr(W, "detach"):
            raise DTypeError(f"W must be a Buckets or a 2-D array, got {type(W).__name__}")
        W = build_buckets(W)
    e = _validate.effort(effort)
    x2, vector = _validate.activations(x, W.n_in)
    y = _validate.output(out, x2.shape[0], W.n_out, vector)
    _no_alias(out, x)
    mults = nbytes = 0
    if x2.shape[0]:
        v, p, s, o, n_out, scales = _arrays(W)
        mults, nbytes = _backend.current.bucketmul(x2, v, p, s, o, n_out, e, y, scales)
    result = out if out is not None else (y[0] if vector else y)
    if not return_info:
        return result
    total = max(x2.shape[0], 1) * W.n_in * W.n_out
    return result, MatmulInfo(mults / total, int(nbytes), int(mults))


def matmul_group(x, Ws, effort=1.0, *, return_info: bool = False):
    """``[matmul(x, W, e) for W, e in zip(Ws, efforts)]`` for matrices that share their input
    (q/k/v, gate/up): the same results, bit for bit, in fewer thread hand-offs — on the CPU one
    job runs the matrices' cutoff searches and then their kernels, each matrix's kernel as soon
    as its search is done.

    ``Ws``: 1 to ``GROUP_MAX`` (4) Buckets with one ``n_in``; ``effort``: one effort, or one per
    matrix. ``x``: ``(n_in,)`` or ``(n_tokens, n_in)``. Returns a list of arrays (and with
    ``return_info`` a list of MatmulInfo). Matrices on a device (``B.to("cuda")``, or a
    ``pyeffort.cuda.CudaGroup``) run on that device's backend.

    >>> import numpy as np, pyeffort
    >>> rng = np.random.default_rng(0)
    >>> Bs = [pyeffort.build_buckets(rng.standard_normal((64, n)).astype(np.float16))
    ...       for n in (64, 32)]
    >>> x = rng.standard_normal(64).astype(np.float32)
    >>> ys = pyeffort.matmul_group(x, Bs, effort=[0.5, 0.3])
    >>> all(np.array_equal(y, pyeffort.matmul(x, B, e)) for y, B, e in zip(ys, Bs, [0.5, 0.3]))
    True
    """
    device = _devices.backend_of(Ws) or _group_backend(Ws)
    if device is not None:
        return device.matmul_group(x, Ws, effort, return_info=return_info)
    _host_activations(x)
    Ws = list(Ws) if isinstance(Ws, (list, tuple)) else Ws
    if not isinstance(Ws, list) or not 1 <= len(Ws) <= GROUP_MAX:
        raise ShapeError(f"Ws must be a list of 1 to {GROUP_MAX} Buckets")
    for W in Ws:
        if not isinstance(W, Buckets):
            raise DTypeError(f"Ws must hold Buckets, got {type(W).__name__}")
        if W.n_in != Ws[0].n_in:
            raise ShapeError(f"the matrices of a group share n_in: {W.n_in} != {Ws[0].n_in}")
    efforts = list(effort) if isinstance(effort, (list, tuple, np.ndarray)) else [effort] * len(Ws)
    if len(efforts) != len(Ws):
        raise ShapeError(f"{len(efforts)} efforts for {len(Ws)} matrices")
    efforts = [_validate.effort(e) for e in efforts]
    group = getattr(_backend.current, "bucketmul_group", None)
    if group is None or (not isinstance(x, np.ndarray) or x.ndim != 1):
        res = [matmul(x, W, e, return_info=True) for W, e in zip(Ws, efforts)]
        ys, infos = [r[0] for r in res], [r[1] for r in res]
        return (ys, infos) if return_info else ys
    x2, _ = _validate.activations(x, Ws[0].n_in)
    ys = [np.empty(W.n_out, dtype=np.float32) for W in Ws]
    counts = group(x2.reshape(-1), [_arrays(W) for W in Ws], efforts, ys)
    if not return_info:
        return ys
    infos = [MatmulInfo(m / (W.n_in * W.n_out), int(b), int(m)) for (m, b), W in zip(counts, Ws)]
    return ys, infos


def _arrays(W: Buckets) -> tuple:
    """W's arrays as a host backend takes them: ``(values, positions, stats, order, n_out,
    scales)`` (scales None for fp16 values)."""
    return (W.values, W.positions, W.stats, W.order, W.n_out, W.scales)


def _group_backend(Ws):
    """The one backend of a list of matrices (None: the host), or DTypeError if they differ."""
    if not isinstance(Ws, (list, tuple)) or not Ws:
        return None
    names = {getattr(W, "backend", None) for W in Ws}
    if len(names) > 1:
        raise DTypeError(f"the matrices of a group live on different devices: {names}")
    return _devices.backend_of(Ws[0])


def _host_activations(x) -> None:
    if _devices.on_device(x):
        raise DTypeError("x is on a device but the matrix is not: move it with B.to(x.device)")


def _no_alias(out, x) -> None:
    """The kernels read x while they write out: the two must not overlap."""
    if out is not None and np.shares_memory(out, x):
        raise LayoutError("out shares memory with x: pass a separate output array")


def prefetch(W) -> None:
    """Starts reading ``W``'s cutoff statistics and in-memory copy into the CPU caches on an
    idle thread of the pool, and returns at once: call it for the matrix you multiply next,
    before other work (a decoding step's attention, norms, activations). ``W`` may be a list
    of up to 8 Buckets (the matrices of a ``matmul_group``): all their statistics are read
    first, then their copies in order. A newer call replaces the request. Results never
    change; with one thread, the numpy backend, or nothing idle, it does nothing.

    >>> import numpy as np, pyeffort
    >>> B = pyeffort.build_buckets(np.ones((64, 32), dtype=np.float16))
    >>> pyeffort.prefetch(B)
    >>> pyeffort.prefetch([B, B])
    """
    Ws = list(W) if isinstance(W, (list, tuple)) else [W]
    for B in Ws:
        if not isinstance(B, Buckets):
            raise DTypeError(f"prefetch takes a Buckets or a list of them, got {type(B).__name__}")
    if len(Ws) > PREFETCH_MAX:
        raise ValueError(f"prefetch takes at most {PREFETCH_MAX} matrices, got {len(Ws)}")
    if Ws and hasattr(_backend.current, "warm"):
        _backend.current.warm([_arrays(B) for B in Ws])


PREFETCH_MAX = 8  # matrices per prefetch call


def prepare(W: Buckets) -> Buckets:
    """Builds now what the CPU kernels read for ``W`` (an input-major index, and on AVX-512
    VBMI2 machines a repacked copy of the weights), which is otherwise built at its first
    ``matmul`` (about 0.3 s for a 4096 x 14336 matrix on 2 cores). Returns ``W``.

    >>> import numpy as np, pyeffort
    >>> B = pyeffort.build_buckets(np.ones((64, 32), dtype=np.float16))
    >>> pyeffort.prepare(B) is B
    True
    """
    if not isinstance(W, Buckets):
        raise DTypeError(f"prepare takes a Buckets, got {type(W).__name__}")
    if hasattr(_backend.current, "prepare"):
        _backend.current.prepare(*_arrays(W))
    return W


def dense_matmul(x, W, *, out=None):
    """Our dense product ``x @ W``, float32 accumulation, for a float16 ``W`` ``(n_in, n_out)``
    or a ``DenseQ8`` (int8 weights with a scale per 32 inputs, ``quantize_dense_q8``): the
    honest baselines for every speed claim, at 2 and 1.0625 bytes per weight.

    >>> import numpy as np, pyeffort
    >>> W = np.full((4, 2), 0.5, dtype=np.float16)
    >>> pyeffort.dense_matmul(np.ones(4, dtype=np.float32), W)
    array([2., 2.], dtype=float32)
    >>> y = pyeffort.dense_matmul(np.ones(4, dtype=np.float32), pyeffort.quantize_dense_q8(W))
    >>> y.round(2)
    array([2., 2.], dtype=float32)
    """
    if isinstance(W, DenseQ8):
        arrays, fn = (W.q, W.scales), getattr(_backend.current, "dense_q8", dense.dense_q8)
    else:
        W = _validate.ndarray("W", W)
        if W.dtype != np.float16:
            raise DTypeError(f"dense_matmul takes a float16 W or a DenseQ8, got {W.dtype}")
        if W.ndim != 2 or 0 in W.shape:
            raise ShapeError(f"W must be a non-empty 2-D matrix, got shape {W.shape}")
        if not W.flags.c_contiguous:
            raise LayoutError("W must be C-contiguous")
        arrays, fn = (W,), _backend.current.dense_f16
    x2, vector = _validate.activations(x, W.shape[0])
    _validate.finite("x", x2)
    y = _validate.output(out, x2.shape[0], W.shape[1], vector)
    _no_alias(out, x)
    if x2.shape[0]:
        fn(x2, *arrays, y)
    if out is not None:
        return out
    return y[0] if vector else y


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: the number of cores).

    >>> import pyeffort
    >>> pyeffort.set_num_threads(1)
    >>> pyeffort.runtime_info()["threads"]
    1
    >>> pyeffort.set_num_threads(2)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 1024:
        raise ValueError(f"set_num_threads needs an integer in 1..1024, got {n!r}")
    if hasattr(_backend.current, "set_num_threads"):
        _backend.current.set_num_threads(int(n))


def runtime_info() -> dict:
    """The backend, kernel and thread count in use, as a dict.

    >>> import pyeffort
    >>> {"backend", "kernel", "threads"} <= set(pyeffort.runtime_info())
    True
    """
    from pyeffort import metal  # imports no torch and no GPU library off macOS

    b = _backend.current
    compiled = hasattr(b, "available_kernels")
    return {
        "backend": b.NAME,
        "kernel": b.kernel_name() if hasattr(b, "kernel_name") else "numpy",
        "threads": b.num_threads() if hasattr(b, "num_threads") else 1,
        "features": b.cpu_features() if compiled else "",
        "kernels": ",".join(b.available_kernels()) if compiled else "numpy",
        "metal": metal.runtime_line(),
    }


def show_runtime() -> None:
    """Print which backend and kernels run (as numpy.show_runtime does).

    >>> import pyeffort
    >>> pyeffort.show_runtime()  # doctest: +ELLIPSIS
     backend: ...
    """
    for k, v in runtime_info().items():
        print(f"{k:>8}: {v}")
