"""The profiling build of the CUDA kernels: the product's sources with %globaltimer stamps of the
kernel's phases (profiling.patch: a `timing` pointer appended to pe_cuda_group), and the Python
side that hands the kernel a stamp buffer. Not part of the package.

    bash experiments/cuda/profiling.sh               # -> .devbuild/libs/prof.so (nvcc, sm_90)
    PE_PROFILE_LIB=.devbuild/libs/prof.so python experiments/cuda/cuda_bench.py --quick

The stamps (32 int64 per buffer): block 0's phases in 0..9, the last block's end in 10, the
first block's start in 11, the first matrix's selector in 12..14, the latest of each phase over
the workers in 16 + phase (cuda_bench.PHASES, LATEST).
"""

from __future__ import annotations

import ctypes
import os

from pyeffort import cuda

_active = False


class GroupWithTiming(cuda._Group):
    """pe_cuda_group of the profiling build: the product's fields, then the stamp buffer."""

    _fields_ = [("timing", ctypes.c_void_p)]  # noqa: RUF012 (ctypes)


def use(path: str) -> None:
    """Load the profiling build at ``path``; call before any matrix is put on the GPU (every
    group must then carry the appended pointer, NULL unless profiled)."""
    global _active
    cuda._Group = GroupWithTiming
    cuda._lib_handle = cuda.load(path)
    _active = True


def active() -> bool:
    return _active


def enable(obj, enabled: bool = True) -> None:
    """Stamp the next calls of ``obj`` (a CudaBuckets or CudaGroup) into ``obj.timing``."""
    torch = cuda._torch()
    grp = obj._alone if isinstance(obj, cuda.CudaBuckets) else obj
    obj.timing = torch.zeros(32, dtype=torch.int64, device=grp.device) if enabled else None
    if enabled:
        obj.timing[11] = 2**62  # a minimum
    grp._g.timing = obj.timing.data_ptr() if enabled else None


if os.environ.get("PE_PROFILE_LIB"):
    use(os.environ["PE_PROFILE_LIB"])
