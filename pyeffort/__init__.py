"""pyeffort: LLM decoding where the amount of arithmetic is a dial turned at run time.

>>> import numpy as np, pyeffort
>>> W = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float16)
>>> B = pyeffort.build_buckets(W)
>>> y = pyeffort.matmul(np.ones(128, dtype=np.float32), B, effort=0.3)
>>> y.shape, y.dtype
((96,), dtype('float32'))
"""

from pyeffort.api import (
    MatmulInfo,
    dense_matmul,
    matmul,
    matmul_group,
    prefetch,
    prepare,
    runtime_info,
    set_num_threads,
    show_runtime,
)
from pyeffort.buckets import Buckets, build_buckets, load_buckets
from pyeffort.dense import DenseQ8, quantize_dense_q8
from pyeffort.errors import (
    BackendError,
    DTypeError,
    EffortError,
    FormatError,
    LayoutError,
    NonFiniteError,
    PyEffortError,
    ShapeError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Buckets",
    "DTypeError",
    "DenseQ8",
    "EffortError",
    "FormatError",
    "LayoutError",
    "MatmulInfo",
    "NonFiniteError",
    "PyEffortError",
    "ShapeError",
    "build_buckets",
    "dense_matmul",
    "load_buckets",
    "matmul",
    "matmul_group",
    "prefetch",
    "prepare",
    "quantize_dense_q8",
    "runtime_info",
    "set_num_threads",
    "show_runtime",
]
