"""The container: safetensors files, written atomically and streamed, read by memory map.

A writer computes the whole header from the tensors' shapes first, so tensors can be produced one
at a time (peak memory: one tensor). Tensors are laid out by alignment (4-byte dtypes, then 2,
then 1) so every memory-mapped view is aligned. The reader checks everything in the header
(sizes, dtypes, offsets, file length) and maps only what is asked: a row prefix of a tensor maps
only those bytes.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyeffort.errors import FormatError

DTYPES = {
    "F32": np.dtype(np.float32),
    "I32": np.dtype(np.int32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),  # raw bits; callers that want bfloat16 convert
    "U8": np.dtype(np.uint8),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),  # read only (Hugging Face checkpoints)
}
CODES = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32", np.dtype(np.float16): "F16"}
CODES.update({np.dtype(np.uint8): "U8", np.dtype(np.int64): "I64"})
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype, shape and a function that produces it when needed."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def default_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open()`` / ``mkdir()`` would give a new file or
    folder (``tempfile`` makes its files 0600 and folders 0700)."""
    return mode & ~current_umask()


def current_umask() -> int:
    """The process umask, read from /proc where Linux shows it (reading it elsewhere means
    setting it and restoring it, which a file created by another thread meanwhile would see)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write(path, specs: Iterable[TensorSpec], metadata: dict[str, str], progress=None) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    specs = sorted(specs, key=lambda s: -np.dtype(s.dtype).itemsize)  # stable: keeps order
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    at = 0
    for s in specs:
        code = CODES.get(np.dtype(s.dtype))
        if code is None:
            raise TypeError(f"cannot store dtype {s.dtype} ({s.name})")
        header[s.name] = {
            "dtype": code,
            "shape": list(s.shape),
            "data_offsets": [at, at + s.nbytes],
        }
        at += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_mode(0o666))  # mkstemp makes 0600: give the file what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in specs:
                a = np.ascontiguousarray(s.produce(), dtype=s.dtype)
                if a.shape != tuple(s.shape):
                    raise ValueError(f"{s.name}: produced {a.shape}, announced {s.shape}")
                f.write(memoryview(a.reshape(-1)).cast("B"))
                if progress is not None:
                    progress(s)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


class Reader:
    """A checked safetensors file: metadata, tensor infos, and memory-mapped (prefix) views."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: too short for a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise FormatError(f"{self.path}: header length {n} does not fit the file")
                raw = f.read(n)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot read ({exc})") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{self.path}: header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        self.tensors = self._check_tensors(header, size - self.data_start)

    def _check_tensors(self, header: dict, data_size: int) -> dict[str, TensorInfo]:
        out, spans = {}, []
        for name, t in header.items():
            try:
                dtype = DTYPES[t["dtype"]]
                shape = tuple(int(d) for d in t["shape"])
                b, e = (int(v) for v in t["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"{self.path}: tensor {name!r} is malformed") from exc
            if any(d < 0 for d in shape) or not 0 <= b <= e <= data_size:
                raise FormatError(f"{self.path}: tensor {name!r} lies outside the file")
            if e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise FormatError(f"{self.path}: tensor {name!r} size does not match its shape")
            out[name] = TensorInfo(dtype, shape, self.data_start + b, e - b)
            spans.append((b, e))
        spans.sort()
        for (_, e0), (b1, _) in itertools.pairwise(spans):
            if b1 < e0:
                raise FormatError(f"{self.path}: tensors overlap")
        return out

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise FormatError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def array(self, name: str, rows: int | None = None, copy: bool = False) -> np.ndarray:
        """The tensor, or its first `rows` rows, memory-mapped read-only (or copied)."""
        t = self.info(name)
        shape = t.shape if rows is None else (rows,) + t.shape[1:]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=t.dtype)
        if copy or t.begin % t.dtype.itemsize:
            with open(self.path, "rb") as f:
                f.seek(t.begin)
                buf = f.read(count * t.dtype.itemsize)
            return np.frombuffer(buf, dtype=t.dtype).reshape(shape).copy()
        return np.memmap(self.path, dtype=t.dtype, mode="r", offset=t.begin, shape=shape)


def page_size() -> int:
    return mmap.PAGESIZE
