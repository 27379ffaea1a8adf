"""The container: safetensors files, written atomically and streamed, read by memory map.

A writer computes the whole header from the tensors' shapes first, so tensors can be produced one
at a time (peak memory: one tensor). Tensors are laid out by alignment (4-byte dtypes, then 2,
then 1) so every memory-mapped view is aligned. The reader checks everything in the header
(schema, sizes, dtypes, offsets, file length) and maps only what is asked: a row prefix of a
tensor maps only those bytes.

Checksums (metadata, all optional for files written before them, which still load unchecked):
``crc32.block`` the block size B; ``crc32.{tensor}`` the CRC32 of each B-byte block of that
tensor's bytes (8 hex digits a block), so a row prefix is verified by the blocks that cover it;
``crc32`` the CRC32 of the header itself (canonical JSON, less this key), so metadata such as a
matrix's ``n_out`` cannot change unnoticed. CRC32 catches every single-bit flip and every burst
of up to 32 bits.

Files are immutable once written: a writer writes a temporary file in the same folder and
renames it over the old one, so a reader's memory map keeps the old file's bytes. Changing a
file in place under a live map (truncating it, writing into it) is outside this contract: a
truncated mapped page kills the reader with SIGBUS, which no check can prevent.
Temporaries are named ``.{final}.pyeffort-tmp-{host}-{pid}-{random}``; every write removes the
stale ones of its folder (their process is gone, or they are older than a day).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import time
import zlib
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
    "I8": np.dtype(np.int8),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),  # read only (Hugging Face checkpoints)
}
CODES = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32", np.dtype(np.float16): "F16"}
CODES.update({np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64"})
MAX_HEADER = 100 * 2**20
MAX_DIM = 2**40  # a tensor dimension or offset beyond this is not a real file
MAX_NDIM = 8
CRC_BLOCK = 2**16  # bytes per checksum block: a partial load reads at most this much extra
CRC_KEY, CRC_BLOCK_KEY, CRC_PREFIX = "crc32", "crc32.block", "crc32."


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype, shape and a function that produces it when needed."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------- temporaries

_TMP = re.compile(r"^\..+\.pyeffort-tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")
STALE_AGE_S = 24 * 3600  # a temporary this old is stale even if its pid names a live process


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def temp_path(final) -> Path:
    """A temporary's name beside ``final``, recognisable by ``remove_stale_temporaries``."""
    final = Path(final)
    tag = f"pyeffort-tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return final.with_name(f".{final.name}.{tag}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _is_stale(entry: os.DirEntry) -> bool:
    m = _TMP.match(entry.name)
    if m is None:
        return False
    try:
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    local = m["host"] == _host()
    return age > STALE_AGE_S or (local and not _alive(int(m["pid"])))


def remove_stale_temporaries(folder) -> list[str]:
    """Deletes the temporaries (files or folders) in ``folder`` left by killed writers: a
    local process that is gone, or older than a day. Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not _is_stale(e):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(e.name)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
    return removed


# ---------------------------------------------------------------- writing


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> dict:
    """The header with zero placeholders for the checksums (fixed width: filled in later)."""
    meta = {k: str(v) for k, v in metadata.items()}
    if any(k == CRC_KEY or k.startswith(CRC_PREFIX) for k in meta):
        raise ValueError(f"metadata keys starting with {CRC_KEY!r} are reserved for checksums")
    meta[CRC_BLOCK_KEY] = str(CRC_BLOCK)
    header: dict = {"__metadata__": meta}
    at = 0
    for s in specs:
        code = CODES.get(np.dtype(s.dtype))
        if code is None:
            raise TypeError(f"cannot store dtype {s.dtype} ({s.name})")
        span = [at, at + s.nbytes]
        header[s.name] = {"dtype": code, "shape": list(s.shape), "data_offsets": span}
        meta[CRC_PREFIX + s.name] = "0" * 8 * -(-s.nbytes // CRC_BLOCK)
        at += s.nbytes
    meta[CRC_KEY] = "0" * 8
    return header


def _encode(header: dict) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def header_crc(header: dict) -> str:
    """CRC32 of the header's canonical JSON, without the ``crc32`` key itself."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != CRC_KEY}
    canon = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(canon.encode()):08x}"


def block_crcs(data) -> str:
    """CRC32 of each CRC_BLOCK bytes of ``data`` (a bytes-like object), as hex."""
    with memoryview(data) as mv, mv.cast("B") as b:
        blocks = range(0, len(b), CRC_BLOCK)
        return "".join(f"{zlib.crc32(b[i : i + CRC_BLOCK]):08x}" for i in blocks)


def write(path, specs: Iterable[TensorSpec], metadata: dict[str, str], progress=None) -> None:
    """Write a safetensors file atomically (a temporary file in the same folder, then rename),
    with the checksums of every tensor; stale temporaries of killed writers there are removed."""
    path = Path(path)
    specs = sorted(specs, key=lambda s: -np.dtype(s.dtype).itemsize)  # stable: keeps order
    header = _header(specs, metadata)
    blob = _encode(header)
    remove_stale_temporaries(path.parent)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in specs:
                a = np.ascontiguousarray(s.produce(), dtype=s.dtype)
                if a.shape != tuple(s.shape):
                    raise ValueError(f"{s.name}: produced {a.shape}, announced {s.shape}")
                data = memoryview(a.reshape(-1)).cast("B")
                header["__metadata__"][CRC_PREFIX + s.name] = block_crcs(data)
                f.write(data)
                if progress is not None:
                    progress(s)
            header["__metadata__"][CRC_KEY] = header_crc(header)
            final = _encode(header)
            assert len(final) == len(blob), "checksums changed the header's length"
            f.seek(8)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


def open_regular(path: Path):
    """A binary file object on ``path`` if it is a regular file; FormatError for anything else
    (FIFOs, devices, folders, missing files), without ever blocking on it."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
        os.close(fd)
        raise FormatError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in a header")


def _no_float(text: str):
    raise ValueError(f"a float ({text}) is not allowed in a header")


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 15:
        raise ValueError(f"integer {text[:20]}... out of range")
    return int(text)


def parse_json(raw: bytes, where, floats: bool = False):
    """JSON text -> object, FormatError for anything malformed: invalid UTF-8 or JSON, NaN or
    Infinity, integers of more than 15 digits, nesting too deep; floats only if ``floats``."""
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=_no_constant,
            parse_float=None if floats else _no_float,
            parse_int=_small_int,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: not valid JSON ({str(exc)[:200]})") from exc


class Reader:
    """A checked safetensors file: metadata, tensor infos, and memory-mapped (prefix) views.

    ``verify`` (default): the header checksum is checked here and each tensor's block checksums
    when it is mapped (for a prefix, the blocks covering it). Files without checksums (written
    before them) load unchecked. The file stays open: views always map the file checked here,
    even if the path is renamed over meanwhile."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._file = open_regular(self.path)
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise
        self._verified: dict[str, int] = {}  # tensor -> bytes verified from its start

    def _read_header(self) -> None:
        fd = self._file.fileno()
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise FormatError(f"{self.path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{self.path}: header length {n} does not fit the file")
            raw = os.pread(fd, n, 8)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot read ({exc})") from exc
        if len(raw) != n:
            raise FormatError(f"{self.path}: file shrank while reading its header")
        header = parse_json(raw, self.path)
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        meta = header.get("__metadata__")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.data_start = 8 + n
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        self.tensors = self._check_tensors(tensors, size - self.data_start)
        self.metadata: dict[str, str] = meta
        self._crcs = self._check_crc_keys(header) if self.verify else None

    def _check_tensors(self, header: dict, data_size: int) -> dict[str, TensorInfo]:
        out, spans = {}, []
        for name, t in header.items():
            dtype, shape, (b, e) = self._entry(name, t)
            if not 0 <= b <= e <= data_size:
                raise FormatError(f"{self.path}: tensor {name!r} lies outside the file")
            if e - b != math.prod(shape) * dtype.itemsize:
                raise FormatError(f"{self.path}: tensor {name!r} size does not match its shape")
            out[name] = TensorInfo(dtype, shape, self.data_start + b, e - b)
            spans.append((b, e))
        spans.sort()
        for (_, e0), (b1, _) in itertools.pairwise(spans):
            if b1 < e0:
                raise FormatError(f"{self.path}: tensors overlap")
        return out

    def _entry(self, name: str, t) -> tuple[np.dtype, tuple[int, ...], list[int]]:
        """One tensor's header entry, checked against the safetensors schema."""

        def ints(v, n_max):
            return (
                isinstance(v, list)
                and len(v) <= n_max
                and all(type(d) is int and 0 <= d <= MAX_DIM for d in v)
            )

        ok = isinstance(t, dict) and set(t) == {"dtype", "shape", "data_offsets"}
        ok = ok and isinstance(t["dtype"], str) and t["dtype"] in DTYPES
        ok = ok and ints(t["shape"], MAX_NDIM) and ints(t["data_offsets"], 2)
        if not ok or len(t["data_offsets"]) != 2:
            raise FormatError(f"{self.path}: tensor {name!r} is malformed")
        return DTYPES[t["dtype"]], tuple(t["shape"]), t["data_offsets"]

    def _check_crc_keys(self, header: dict) -> dict[str, str] | None:
        """The tensors' block checksums after checking the header's own; None for a file
        written before checksums."""
        meta = self.metadata
        if not any(k == CRC_KEY or k.startswith(CRC_PREFIX) for k in meta):
            return None
        if meta.get(CRC_KEY) != header_crc(header):
            raise FormatError(f"{self.path}: header checksum mismatch (the header is damaged)")
        if meta.get(CRC_BLOCK_KEY) != str(CRC_BLOCK):
            raise FormatError(f"{self.path}: checksum block {meta.get(CRC_BLOCK_KEY)!r} unknown")
        crcs = {}
        for name, t in self.tensors.items():
            c = meta.get(CRC_PREFIX + name)
            if c is None or len(c) != 8 * -(-t.nbytes // CRC_BLOCK):
                raise FormatError(f"{self.path}: checksums of tensor {name!r} missing or cut")
            crcs[name] = c
        return crcs

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise FormatError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def array(self, name: str, rows: int | None = None, copy: bool = False) -> np.ndarray:
        """The tensor, or its first `rows` rows, memory-mapped read-only (or copied); its bytes
        verified against the checksums when the reader verifies."""
        t = self.info(name)
        shape = t.shape if rows is None else (rows,) + t.shape[1:]
        count = math.prod(shape)
        if rows is not None and not (len(t.shape) and 0 <= rows <= t.shape[0]):
            raise FormatError(f"{self.path}: {rows} rows asked of {name!r} {list(t.shape)}")
        self._verify(name, t, count * t.dtype.itemsize)
        if count == 0:
            return np.zeros(shape, dtype=t.dtype)
        if copy or t.begin % t.dtype.itemsize:
            buf = os.pread(self._file.fileno(), count * t.dtype.itemsize, t.begin)
            return np.frombuffer(buf, dtype=t.dtype).reshape(shape).copy()
        return np.memmap(self._file, dtype=t.dtype, mode="r", offset=t.begin, shape=shape)

    def _verify(self, name: str, t: TensorInfo, nbytes: int) -> None:
        """Checks the blocks of tensor ``name`` that cover its first ``nbytes`` bytes."""
        if self._crcs is None or nbytes <= self._verified.get(name, 0):
            return
        n_blocks = -(-nbytes // CRC_BLOCK)
        length = min(n_blocks * CRC_BLOCK, t.nbytes)
        base = t.begin - t.begin % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(
            self._file.fileno(), length + t.begin - base, access=mmap.ACCESS_READ, offset=base
        ) as m:
            with memoryview(m) as mv:
                got = block_crcs(mv[t.begin - base :])
        if got != self._crcs[name][: 8 * n_blocks]:
            raise FormatError(f"{self.path}: checksum mismatch in tensor {name!r} (damaged data)")
        self._verified[name] = length


def page_size() -> int:
    return mmap.PAGESIZE
