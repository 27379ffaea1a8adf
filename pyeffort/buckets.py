"""Buckets: a weight matrix preprocessed for effort matmuls, and its file format.

File format (version 2): a safetensors file whose ``__metadata__`` holds ``format=pyeffort``,
``version=2``, ``kind=buckets`` and, per matrix, ``{prefix}n_in``, ``{prefix}n_out``,
``{prefix}stat`` (``rms``, or ``rms_out_weighted`` for buckets built with per-output weights;
a file without it is ``rms``), ``{prefix}source_dtype``, ``{prefix}values`` (``f16`` or ``q8``);
tensors ``{prefix}values`` (F16, or I8 for q8, 16*n_in x G), ``{prefix}positions`` (U8, 16*n_in
x ceil(G/2)), ``{prefix}stats`` (F32, 16 x n_in), ``{prefix}order`` (I32, 16 x n_in) and, for
q8 only, ``{prefix}scales`` (F16, 4*n_in x ceil(G/4)), rows as reference.py describes. Version 1
(still read) is version 2 with fp16 values and no ``{prefix}values`` key. A model file holds
many matrices under different prefixes. Checksums: see pyeffort.fileformat.

Loading checks the structure (what the compiled core trusts) always, and the checksums and the
data (finite values, distinct positions, the padding of the last group as built) unless told
not to: a header whose ``n_out`` lies is caught by the header's checksum, and without one (files
written before checksums) a smaller ``n_out`` by the padding check; a larger one that keeps the
group count claims outputs of zero weights and is not detectable there.
"""

from __future__ import annotations

import numpy as np

from pyeffort import _backend, _devices, _validate, fileformat, reference
from pyeffort.errors import BackendError, DTypeError, FormatError

FORMAT, VERSION = "pyeffort", 2
VERSIONS = ("1", "2")  # the versions this pyeffort reads (1: fp16 values only)
GROUP, N_RANKS = reference.GROUP, reference.N_RANKS
STAT = "rms"  # the plain build's row statistic
STAT_OUT_WEIGHTED = "rms_out_weighted"  # build_buckets(W, out_weight=a)
STATS = (STAT, STAT_OUT_WEIGHTED)
F16, Q8 = "f16", "q8"  # value kinds: fp16 values, or int8 values with fp16 scales
VALUE_KINDS = (F16, Q8)


class Buckets:
    """A matrix ``W`` (n_in, n_out) in bucket form; ``pyeffort.matmul(x, B, effort)`` ~ ``x @ W``.

    >>> import numpy as np, pyeffort
    >>> W = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float16)
    >>> B = pyeffort.build_buckets(W)
    >>> B.shape, B.n_groups, B.loaded_fraction
    ((64, 40), 3, 1.0)
    """

    def __init__(
        self, values, positions, stats, order, n_out: int, source_dtype: str = "float16",
        stat: str = STAT, *, verify: bool = True, scales=None,
    ):  # fmt: skip
        """Checks the arrays (``_validate.bucket_arrays``: dtypes, layout, shapes against
        ``n_in = stats.shape[1]`` and ``n_out``, ``order`` a permutation, ``stats`` finite and
        sorted; int8 ``values`` with their ``scales``, finite and non-negative, as
        ``reference.quantise_q8`` writes them, float16 values without) and, unless
        ``verify=False``, their data (``_validate.bucket_data``: finite values or no -128,
        distinct positions per group, the padding as built): a matrix that passes cannot make
        the compiled core read out of bounds. ``stats`` and ``order`` are copied; all the
        arrays are held read-only."""
        stats = _readonly(np.array(stats, copy=True) if isinstance(stats, np.ndarray) else stats)
        order = _readonly(np.array(order, copy=True) if isinstance(order, np.ndarray) else order)
        _validate.bucket_arrays(values, positions, stats, order, n_out, scales)
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
        if verify:
            _validate.bucket_data(values, positions, order, int(n_out))
        self._values = _readonly(values)  # (n_rows, G) float16 or int8, rank-major bucket rows
        self._positions = _readonly(positions)  # (n_rows, ceil(G/2)) uint8, 4-bit positions
        self._stats = stats  # (16, n_in) float32, row statistic in row order
        self._order = order  # (16, n_in) int32, input of each row
        self._scales = _readonly(scales)  # (scale_rows, ceil(G/4)) float16 for q8, else None
        self.n_in = int(stats.shape[1])
        self.n_out = int(n_out)
        self.source_dtype = str(source_dtype)
        self.stat = stat  # what the row statistic is: STAT or STAT_OUT_WEIGHTED
        self._device = None  # backends may attach a repacked copy here

    values = property(lambda self: self._values, doc="(n_rows, G) float16 or int8 bucket rows")
    positions = property(lambda self: self._positions, doc="(n_rows, ceil(G/2)) uint8")
    stats = property(lambda self: self._stats, doc="(16, n_in) float32 row statistics")
    order = property(lambda self: self._order, doc="(16, n_in) int32 input of each row")
    scales = property(
        lambda self: self._scales, doc="q8: (scale_rows, ceil(G/4)) float16 scales; f16: None"
    )

    # ------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, weight, out_weight=None, values: str = F16) -> Buckets:
        """From a layer weight ``(n_out, n_in)`` (``nn.Linear.weight``): buckets of ``weight.T``
        (``out_weight``, ``values``: as in ``build_buckets``).

        >>> import numpy as np, pyeffort
        >>> lin = np.ones((3, 5), dtype=np.float32)  # 5 inputs, 3 outputs
        >>> pyeffort.Buckets.from_linear(lin).shape
        (5, 3)
        """
        if hasattr(weight, "detach") and hasattr(weight, "float"):
            weight = weight.detach().float().cpu().numpy()
        w = _validate.ndarray("weight", weight)
        if w.ndim != 2:
            from pyeffort.errors import ShapeError

            raise ShapeError(f"weight must be 2-D (n_out, n_in), got shape {w.shape}")
        return build_buckets(w.T, out_weight, values=values)

    # ------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out)

    @property
    def n_groups(self) -> int:
        return reference.n_groups(self.n_out)

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def loaded_fraction(self) -> float:
        """Fraction of the matrix's multiplications present in memory (1.0 unless partially loaded)."""
        m = np.repeat(reference.row_mults(self.n_out), self.n_in)
        return float(m[: self.n_rows].sum() / (self.n_in * self.n_out))

    @property
    def values_kind(self) -> str:
        """``"f16"`` (fp16 values) or ``"q8"`` (int8 values with fp16 scales)."""
        return F16 if self._scales is None else Q8

    @property
    def nbytes(self) -> int:
        """Bytes of the bucket rows held (values and positions, and the q8 scales)."""
        extra = 0 if self._scales is None else self._scales.nbytes
        return int(self.values.nbytes + self.positions.nbytes + extra)

    @property
    def bytes_per_mult(self) -> float:
        """Bytes held per multiplication of the loaded rows (what a product at effort 1.0
        reads per multiplication): 2.5 for fp16 values, 1.625 for q8 (1 + 0.5 + 2/16), a little
        more where the last group or chunk is padded; NaN when no row is loaded.

        >>> import numpy as np, pyeffort
        >>> W = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float16)
        >>> [pyeffort.build_buckets(W, values=v).bytes_per_mult for v in ("f16", "q8")]
        [2.5, 1.625]
        """
        mults = self.loaded_fraction * self.n_in * self.n_out
        return self.nbytes / mults if mults else float("nan")

    def __repr__(self) -> str:
        return (
            f"Buckets(n_in={self.n_in}, n_out={self.n_out}, values={self.values_kind!r}, "
            f"loaded_fraction={self.loaded_fraction:.3f}, nbytes={self.nbytes})"
        )

    def to_dense(self, dtype=np.float16) -> np.ndarray:
        """The loaded part of the matrix ``(n_in, n_out)`` (dropped rows are zero), float16 or
        ``dtype=np.float32``; q8 values dequantised (``q * scale``: exact in float32, rounded to
        the nearest float16 in float16)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise DTypeError(f"to_dense gives float16 or float32, got {dtype}")
        g = self.n_groups
        w = np.zeros((self.n_in, g * GROUP), dtype=dtype)
        pos = reference.unpack_nibbles(np.asarray(self.positions), g).astype(np.int64)
        inputs = self.order.ravel()[: self.n_rows].astype(np.int64)
        cols = GROUP * np.arange(g)[None, :] + pos
        if self._scales is None:
            w[inputs[:, None], cols] = self.values
        else:
            w[inputs[:, None], cols] = reference.dequantise(self.values, self._scales, self.order)
        return np.ascontiguousarray(w[:, : self.n_out])

    def to(self, device):
        """This matrix on ``device``: ``"cpu"`` gives itself, ``"cuda"`` (or ``"cuda:N"``) a
        CudaBuckets repacked for the GPU kernels (needs torch with CUDA; see pyeffort.cuda).
        q8 values go only to a device backend whose ``VALUE_KINDS`` names ``"q8"``."""
        kind = str(device).split(":")[0]
        if kind == "cpu":
            return self
        backend = _devices.get(kind)
        if self.values_kind not in getattr(backend, "VALUE_KINDS", (F16,)):
            raise BackendError(f"the {kind} backend has no kernels for {self.values_kind} values")
        return backend.to_device(self, device)

    # ------------------------------------------------------------ files

    def tensor_specs(self, prefix: str = "") -> list[fileformat.TensorSpec]:
        arrays = {
            "values": self.values,
            "positions": self.positions,
            "stats": self.stats,
            "order": self.order,
        }
        if self._scales is not None:
            arrays["scales"] = self._scales
        return [
            fileformat.TensorSpec(prefix + k, a.dtype, a.shape, (lambda a=a: np.asarray(a)))
            for k, a in arrays.items()
        ]

    def metadata(self, prefix: str = "") -> dict[str, str]:
        return {
            prefix + "n_in": str(self.n_in),
            prefix + "n_out": str(self.n_out),
            prefix + "stat": self.stat,
            prefix + "source_dtype": self.source_dtype,
            prefix + "values": self.values_kind,
        }

    def save(self, path) -> None:
        """Write to ``path`` (a ``.safetensors`` file), atomically.

        >>> import numpy as np, pyeffort, tempfile, os
        >>> B = pyeffort.build_buckets(np.eye(32, dtype=np.float16))
        >>> path = os.path.join(tempfile.mkdtemp(), "eye.safetensors")
        >>> B.save(path)
        >>> pyeffort.load_buckets(path).shape
        (32, 32)
        """
        meta = {"format": FORMAT, "version": str(VERSION), "kind": "buckets"}
        meta.update(self.metadata())
        fileformat.write(path, self.tensor_specs(), meta)


def build_buckets(W, out_weight=None, values: str = F16) -> Buckets:
    """Preprocess ``W`` ``(n_in, n_out)`` (float16, float32 or bfloat16) once for effort matmuls.

    Any layout is accepted (the matrix is copied to float16). NaN or Inf raise NonFiniteError.
    ``out_weight`` (optional, ``(n_out,)`` floats, non-negative, not all zero): how much each
    output matters (e.g. calibrated per model). Each group's ranks then follow
    ``abs(fp16(a_j * w_ij))`` and each bucket row's statistic is the RMS of those weighted
    values (``stat == "rms_out_weighted"``); the stored values are still the true weights, so
    effort 1.0 is still the full product.
    ``values``: ``"f16"`` (the default) stores fp16 values (2.5 bytes per multiplication);
    ``"q8"`` quantises the same buckets to int8 values with one fp16 scale per 16 values
    (``reference.quantise_q8``; 1.625 bytes), and effort 1.0 is the product of the
    dequantised weights.

    >>> import numpy as np, pyeffort
    >>> W = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> x = np.ones(3, dtype=np.float32)
    >>> pyeffort.matmul(x, pyeffort.build_buckets(W), effort=1.0)
    array([12., 15., 18., 21.], dtype=float32)
    >>> a = np.array([4.0, 1.0, 1.0, 1.0], dtype=np.float32)  # output 0 matters most
    >>> B = pyeffort.build_buckets(W, out_weight=a)
    >>> B.stat, pyeffort.matmul(x, B, effort=1.0)
    ('rms_out_weighted', array([12., 15., 18., 21.], dtype=float32))
    """
    kind = check_values(values)
    source = str(getattr(W, "dtype", type(W).__name__)).replace("torch.", "")
    w16 = _validate.weight_matrix(W)
    stat = STAT
    if out_weight is None:
        v16, positions, stats, order = _backend.current.build(w16)
    else:
        a = _validate.out_weight(out_weight, w16.shape[1])
        with np.errstate(over="ignore"):
            weighted = (w16.astype(np.float32) * a).astype(np.float16)  # ranks and stats follow
        if not np.isfinite(weighted).all():
            raise ValueError("out_weight * W overflows float16 (scale out_weight down)")
        _, positions, stats, order = _backend.current.build(weighted)
        v16, stat = _true_values(w16, positions, order), STAT_OUT_WEIGHTED
    scales = None
    if kind == Q8:
        v16, scales = reference.quantise_q8(v16, order)
    n_out = w16.shape[1]
    return Buckets(v16, positions, stats, order, n_out, source, stat, verify=False, scales=scales)


def check_values(values) -> str:
    if not isinstance(values, str) or values not in VALUE_KINDS:
        raise ValueError(f"values must be one of {VALUE_KINDS}, got {values!r}")
    return values


def _readonly(a):
    """A read-only view of an ndarray (anything else is left to the checks to refuse)."""
    if isinstance(a, np.ndarray) and a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _true_values(w16: np.ndarray, positions: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The weights of ``w16`` at each bucket row's positions: (16 n_in, G) float16."""
    n_in, n_out = w16.shape
    g = reference.n_groups(n_out)
    padded = np.zeros((n_in, g * GROUP), dtype=np.float16)
    padded[:, :n_out] = w16
    cols = GROUP * np.arange(g, dtype=np.int64)[None, :]
    values = np.empty((N_RANKS * n_in, g), dtype=np.float16)
    for k in range(N_RANKS):  # one rank at a time: the index arrays stay n_in x G
        rows = slice(k * n_in, (k + 1) * n_in)
        pos = reference.unpack_nibbles(positions[rows], g).astype(np.int64)
        values[rows] = padded[order[k].astype(np.int64)[:, None], cols + pos]
    return values


# ---------------------------------------------------------------- loading


def check_version(reader: fileformat.Reader) -> None:
    meta = reader.metadata
    if meta.get("format") != FORMAT:
        raise FormatError(f"{reader.path}: not a pyeffort file (format={meta.get('format')!r})")
    if meta.get("version") not in VERSIONS:
        raise FormatError(
            f"{reader.path}: format version {meta.get('version')!r} is not supported "
            f"(this pyeffort reads versions {', '.join(VERSIONS)})"
        )


def _file_value_kind(reader: fileformat.Reader, prefix: str) -> str:
    """The value kind of the matrix under ``prefix``: version 2 names it, version 1 is f16."""
    kind = reader.metadata.get(prefix + "values")
    if reader.metadata.get("version") == "1":
        if kind is not None:
            raise FormatError(f"{reader.path}: {prefix}values in a version-1 file")
        return F16
    if kind not in VALUE_KINDS:
        raise FormatError(f"{reader.path}: {prefix}values={kind!r} is not one of {VALUE_KINDS}")
    return kind


def _int_meta(reader, key: str) -> int:
    try:
        v = int(reader.metadata[key])
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{reader.path}: metadata {key!r} missing or not an integer") from exc
    if not 1 <= v < 2**31 // 16:
        raise FormatError(f"{reader.path}: metadata {key!r}={v} out of range")
    return v


def read_buckets(reader: fileformat.Reader, prefix: str = "", fraction: float = 1.0) -> Buckets:
    """The matrix stored under ``prefix`` in an opened file, keeping a ``fraction`` of its rows;
    checked as the Buckets constructor checks (its data too when ``reader.verify``), every
    failure a FormatError."""
    n_in, n_out = _int_meta(reader, prefix + "n_in"), _int_meta(reader, prefix + "n_out")
    kind = _file_value_kind(reader, prefix)
    g = reference.n_groups(n_out)
    expect = {
        "values": (np.int8 if kind == Q8 else np.float16, (N_RANKS * n_in, g)),
        "positions": (np.uint8, (N_RANKS * n_in, (g + 1) // 2)),
        "stats": (np.float32, (N_RANKS, n_in)),
        "order": (np.int32, (N_RANKS, n_in)),
    }
    if kind == Q8:
        expect["scales"] = (np.float16, (N_RANKS // reference.TIER * n_in, reference.n_chunks(g)))
    elif prefix + "scales" in reader.tensors:
        raise FormatError(f"{reader.path}: {prefix}scales beside fp16 values")
    for name, (dtype, shape) in expect.items():
        t = reader.info(prefix + name)
        if t.dtype != np.dtype(dtype) or t.shape != shape:
            raise FormatError(
                f"{reader.path}: {prefix + name} is {t.dtype}{list(t.shape)}, "
                f"expected {np.dtype(dtype)}{list(shape)}"
            )
    source = reader.metadata.get(prefix + "source_dtype", "float16")
    stat = reader.metadata.get(prefix + "stat", STAT)
    if stat not in STATS:
        raise FormatError(f"{reader.path}: {prefix}stat={stat!r} is not one of {STATS}")
    stats = reader.array(prefix + "stats", copy=True)
    order = reader.array(prefix + "order", copy=True)
    n_rows = rows_for_fraction(n_in, n_out, fraction)
    values = reader.array(prefix + "values", rows=n_rows)
    positions = reader.array(prefix + "positions", rows=n_rows)
    scales = None
    if kind == Q8:  # the scales of a row prefix are a prefix of the scales
        scales = reader.array(prefix + "scales", rows=reference.scale_rows(n_rows, n_in))
    try:
        return Buckets(
            values, positions, stats, order, n_out, source, stat,
            verify=reader.verify, scales=scales,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{reader.path}: {prefix or 'matrix'}: {exc}") from exc


def rows_for_fraction(n_in: int, n_out: int, fraction: float) -> int:
    """Rows to keep so that the kept multiplications are the nearest to ``fraction``."""
    fraction = _validate.effort(fraction, "fraction")
    m = np.repeat(reference.row_mults(n_out), n_in)
    cum = np.concatenate([[0], np.cumsum(m)])
    return int(np.abs(cum - fraction * n_in * n_out).argmin())


def load_buckets(path, *, fraction: float = 1.0, verify: bool = True) -> Buckets:
    """Open a file written by ``Buckets.save``; ``fraction < 1`` maps only the most important
    ``fraction`` of the bucket rows (a prefix of the file), so less is read and held.

    Raises FormatError for anything that is not a valid pyeffort buckets file: the header, the
    structure and (``verify``, the default) the checksums of the mapped bytes and the data
    (finite values, distinct positions). ``verify=False`` skips the last two and trusts the
    file's data (the compiled core still refuses NaN/Inf values and repeated positions).
    The file must not change while loaded (files are immutable: write a new one, rename).

    >>> import numpy as np, pyeffort, tempfile, os
    >>> W = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float16)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> pyeffort.build_buckets(W).save(path)
    >>> B = pyeffort.load_buckets(path, fraction=0.5)
    >>> round(B.loaded_fraction, 3)
    0.5
    """
    fraction = _validate.effort(fraction, "fraction")
    with fileformat.Reader(path, verify=verify) as reader:
        check_version(reader)
        if reader.metadata.get("kind") != "buckets":
            kind = reader.metadata.get("kind")
            raise FormatError(f"{reader.path}: holds a {kind!r}, not buckets")
        return read_buckets(reader, "", fraction)
