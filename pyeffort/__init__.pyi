from collections.abc import Sequence
from os import PathLike
from typing import Literal, NamedTuple, overload

import numpy as np
import numpy.typing as npt

__version__: str

class PyEffortError(Exception): ...
class ShapeError(PyEffortError, ValueError): ...
class DTypeError(PyEffortError, TypeError): ...
class LayoutError(PyEffortError, ValueError): ...
class NonFiniteError(PyEffortError, ValueError): ...
class EffortError(PyEffortError, ValueError): ...
class FormatError(PyEffortError, ValueError): ...
class BackendError(PyEffortError, RuntimeError): ...

class MatmulInfo(NamedTuple):
    effort: float
    bytes_read: int
    mults: int

class Buckets:
    def __init__(
        self,
        values: npt.NDArray[np.float16] | npt.NDArray[np.int8],
        positions: npt.NDArray[np.uint8],
        stats: npt.NDArray[np.float32],
        order: npt.NDArray[np.int32],
        n_out: int,
        source_dtype: str = "float16",
        stat: str = "rms",
        *,
        verify: bool = True,
        scales: npt.NDArray[np.float16] | None = None,
    ) -> None: ...
    @property
    def values(self) -> npt.NDArray[np.float16] | npt.NDArray[np.int8]: ...  # (n_rows, n_groups)
    @property
    def positions(self) -> npt.NDArray[np.uint8]: ...  # (n_rows, ceil(n_groups / 2))
    @property
    def stats(self) -> npt.NDArray[np.float32]: ...  # (16, n_in)
    @property
    def order(self) -> npt.NDArray[np.int32]: ...  # (16, n_in)
    @property
    def scales(self) -> npt.NDArray[np.float16] | None: ...  # q8: (scale_rows, ceil(G / 4))
    n_in: int
    n_out: int
    source_dtype: str
    stat: str  # "rms" or "rms_out_weighted"
    @classmethod
    def from_linear(
        cls,
        weight: npt.ArrayLike,
        out_weight: npt.NDArray[np.floating] | None = None,
        values: Literal["f16", "q8"] = "f16",
    ) -> Buckets: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def n_groups(self) -> int: ...
    @property
    def n_rows(self) -> int: ...
    @property
    def loaded_fraction(self) -> float: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def values_kind(self) -> Literal["f16", "q8"]: ...
    @property
    def bytes_per_mult(self) -> float: ...
    def to_dense(
        self, dtype: type[np.float16 | np.float32] = ...
    ) -> npt.NDArray[np.float16] | npt.NDArray[np.float32]: ...
    def save(self, path: str | PathLike[str]) -> None: ...

def build_buckets(
    W: npt.ArrayLike,
    out_weight: npt.NDArray[np.floating] | None = None,
    values: Literal["f16", "q8"] = "f16",
) -> Buckets: ...
def load_buckets(
    path: str | PathLike[str], *, fraction: float = 1.0, verify: bool = True
) -> Buckets: ...
@overload
def matmul(
    x: npt.NDArray[np.floating],
    W: Buckets | npt.NDArray[np.floating],
    effort: float = 1.0,
    *,
    out: npt.NDArray[np.float32] | None = None,
    return_info: Literal[False] = False,
) -> npt.NDArray[np.float32]: ...
@overload
def matmul(
    x: npt.NDArray[np.floating],
    W: Buckets | npt.NDArray[np.floating],
    effort: float = 1.0,
    *,
    out: npt.NDArray[np.float32] | None = None,
    return_info: Literal[True],
) -> tuple[npt.NDArray[np.float32], MatmulInfo]: ...
def matmul_group(
    x: npt.NDArray[np.floating],
    Ws: Sequence[Buckets],
    effort: float | Sequence[float] = 1.0,
    *,
    return_info: bool = False,
) -> list[npt.NDArray[np.float32]] | tuple[list[npt.NDArray[np.float32]], list[MatmulInfo]]: ...
def prefetch(W: Buckets | Sequence[Buckets]) -> None: ...
def prepare(W: Buckets) -> Buckets: ...
class DenseQ8:
    def __init__(self, q: npt.NDArray[np.int8], scales: npt.NDArray[np.float16]) -> None: ...
    q: npt.NDArray[np.int8]  # (n_in, n_out), read-only
    scales: npt.NDArray[np.float16]  # (ceil(n_in / 32), n_out), read-only
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def bytes_per_weight(self) -> float: ...
    def dequantize(self) -> npt.NDArray[np.float32]: ...

def quantize_dense_q8(W: npt.NDArray[np.float16] | npt.NDArray[np.float32]) -> DenseQ8: ...
def dense_matmul(
    x: npt.NDArray[np.floating],
    W: npt.NDArray[np.float16] | DenseQ8,
    *,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def set_num_threads(n: int) -> None: ...
def runtime_info() -> dict[str, object]: ...
def show_runtime() -> None: ...
