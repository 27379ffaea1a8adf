"""File format version 2: q8 matrices (I8 values, F16 scales, ``values=q8``) and f16 ones
(``values=f16``) round trip, a partial load maps a prefix of the scales too, version-1 files
(as pyeffort wrote them before version 2) load unchanged, and damaged q8 files are
FormatErrors."""

import json
import struct

import numpy as np
import pytest

import pyeffort
from pyeffort import FormatError, _backend, fileformat, reference


def q8(rng, shape=(37, 70)):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    return pyeffort.build_buckets(w, np.linspace(0.5, 2, shape[1]).astype(np.float32), "q8")


@pytest.fixture
def numpy_backend():
    previous = _backend.use("numpy")
    yield
    _backend.current = previous


def test_round_trip(tmp_path, rng):
    for b in (q8(rng), pyeffort.build_buckets(rng.standard_normal((9, 40)).astype(np.float16))):
        path = tmp_path / f"{b.values_kind}.safetensors"
        b.save(path)
        r = fileformat.Reader(path)
        assert r.metadata["version"] == "2" and r.metadata["values"] == b.values_kind
        assert ("scales" in r.tensors) == (b.values_kind == "q8")
        c = pyeffort.load_buckets(path)
        assert c.values_kind == b.values_kind and c.stat == b.stat
        for k in ("values", "positions", "stats", "order"):
            np.testing.assert_array_equal(getattr(c, k), getattr(b, k))
        if b.scales is not None:
            assert r.tensors["values"].dtype == np.int8
            np.testing.assert_array_equal(c.scales.view(np.uint16), b.scales.view(np.uint16))
        assert c.bytes_per_mult == b.bytes_per_mult


@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.2, 0.25, 0.5, 0.61, 1.0])
def test_partial_load_maps_a_prefix_of_the_scales(tmp_path, rng, numpy_backend, fraction):
    b = q8(rng)
    b.save(tmp_path / "b.safetensors")
    h = pyeffort.load_buckets(tmp_path / "b.safetensors", fraction=fraction)
    n = h.n_rows
    assert abs(h.loaded_fraction - fraction) < 0.05
    assert h.scales.shape[0] == reference.scale_rows(n, b.n_in) <= b.scales.shape[0]
    np.testing.assert_array_equal(h.scales, b.scales[: h.scales.shape[0]])
    np.testing.assert_array_equal(h.values, b.values[:n])
    x = rng.standard_normal((2, b.n_in)).astype(np.float32)
    for e in (0.1, 0.5, 1.0):
        want = np.empty((2, b.n_out), np.float32)
        args = (b.values[:n], b.positions[:n], b.stats, b.order, b.n_out, e, want)
        counts = reference.bucketmul(x, *args, scales=b.scales[: reference.scale_rows(n, b.n_in)])
        y, info = pyeffort.matmul(x, h, e, return_info=True)
        np.testing.assert_array_equal(y, want)
        assert (info.mults, info.bytes_read) == counts


def test_a_partial_load_reads_only_its_prefix(tmp_path, rng):
    """Damage past the kept prefix of values, positions and scales goes unnoticed (and unread)
    by a partial load, and is caught by a full one."""
    b = q8(rng, (512, 2048))  # scales of 2 checksum blocks
    path = tmp_path / "b.safetensors"
    b.save(path)
    h = pyeffort.load_buckets(path, fraction=0.1)
    k = h.scales.shape[0]
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    t = json.loads(raw[8 : 8 + n])["scales"]
    at = 8 + n + t["data_offsets"][1] - 2  # the last scale: far past the prefix's blocks
    assert t["data_offsets"][0] + k * b.scales.shape[1] * 2 + fileformat.CRC_BLOCK < at - 8 - n
    raw[at + 1] ^= 0x7C  # a NaN (or a wrong value)
    path.write_bytes(bytes(raw))
    pyeffort.load_buckets(path, fraction=0.1)
    with pytest.raises(FormatError, match="checksum mismatch in tensor 'scales'"):
        pyeffort.load_buckets(path)


# ---------------------------------------------------------------- version 1


def v1_file(path, b):
    """A version-1 file exactly as pyeffort wrote them before version 2 (Buckets.save)."""
    meta = {"format": "pyeffort", "version": "1", "kind": "buckets", "n_in": str(b.n_in),
            "n_out": str(b.n_out), "stat": b.stat, "source_dtype": b.source_dtype}  # fmt: skip
    specs = [fileformat.TensorSpec(k, getattr(b, k).dtype, getattr(b, k).shape,
                                   (lambda k=k: np.asarray(getattr(b, k))))
             for k in ("values", "positions", "stats", "order")]  # fmt: skip
    fileformat.write(path, specs, meta)


def test_version_1_files_load_and_run_unchanged(tmp_path, rng):
    w = rng.standard_normal((40, 50)).astype(np.float16)
    b = pyeffort.build_buckets(w)
    v1_file(tmp_path / "v1.safetensors", b)
    c = pyeffort.load_buckets(tmp_path / "v1.safetensors")
    assert c.values_kind == "f16" and c.scales is None
    x = rng.standard_normal(40).astype(np.float32)
    for e in (0.2, 1.0):
        assert np.array_equal(pyeffort.matmul(x, c, e), pyeffort.matmul(x, b, e))
    h = pyeffort.load_buckets(tmp_path / "v1.safetensors", fraction=0.5)
    np.testing.assert_array_equal(h.values, b.values[: h.n_rows])


# ---------------------------------------------------------------- damaged files


def write(path, b, meta=None, drop=(), **arrays):
    """``b``'s file with some arrays replaced, added or dropped (checksums valid)."""
    m = {"format": "pyeffort", "version": "2", "kind": "buckets", **b.metadata(), **(meta or {})}
    m = {k: v for k, v in m.items() if v is not None}
    a = {"values": b.values, "positions": b.positions, "stats": b.stats, "order": b.order}
    if b.scales is not None:
        a["scales"] = b.scales
    a.update(arrays)
    specs = [fileformat.TensorSpec(k, v.dtype, v.shape, (lambda v=v: np.asarray(v)))
             for k, v in a.items() if k not in drop]  # fmt: skip
    fileformat.write(path, specs, m)
    return path


def damaged_scale(b, value):
    s = np.array(b.scales)
    s[5, 1] = value
    return s


def damaged_values(b):
    v = np.array(b.values)
    v[3, 4] = -128
    return v


CASES = {
    "scale NaN": (lambda b: {"scales": damaged_scale(b, np.nan)}, "finite and non-negative"),
    "scale Inf": (lambda b: {"scales": damaged_scale(b, np.inf)}, "finite and non-negative"),
    "scale < 0": (lambda b: {"scales": damaged_scale(b, -0.5)}, "finite and non-negative"),
    "value -128": (lambda b: {"values": damaged_values(b)}, "-128"),
    "short scales": (lambda b: {"scales": np.array(b.scales[:-1])}, r"scales is float16\[147"),
    "narrow scales": (lambda b: {"scales": np.array(b.scales[:, :1])}, "scales is float16"),
    "f32 scales": (lambda b: {"scales": b.scales.astype(np.float32)}, "scales is float32"),
    "no scales": (lambda b: {"drop": ("scales",)}, "'scales' is missing"),
    "fp16 values": (lambda b: {"values": b.values.astype(np.float16)}, "values is float16"),
    "values=f16": (lambda b: {"meta": {"values": "f16"}}, "scales beside fp16 values"),
    "values=f16, no scales": (
        lambda b: {"meta": {"values": "f16"}, "drop": ("scales",)},
        "values is int8",
    ),
    "values=q4": (lambda b: {"meta": {"values": "q4"}}, "values='q4' is not one of"),
    "no values key": (lambda b: {"meta": {"values": None}}, "values=None is not one of"),
    "q8 in version 1": (lambda b: {"meta": {"version": "1"}}, "values in a version-1 file"),
    "version 3": (lambda b: {"meta": {"version": "3"}}, "version '3' is not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_damaged_q8_files_are_format_errors(tmp_path, rng, case, fraction):
    b = q8(rng)
    make, message = CASES[case]
    kw = make(b)
    path = write(tmp_path / "d.safetensors", b, kw.pop("meta", None), kw.pop("drop", ()), **kw)
    with pytest.raises(FormatError, match=message):
        pyeffort.load_buckets(path, fraction=fraction)


def test_scales_beside_fp16_values_are_a_format_error(tmp_path, rng):
    b = pyeffort.build_buckets(rng.standard_normal((9, 40)).astype(np.float16))
    path = write(tmp_path / "d.safetensors", b, scales=np.ones((36, 1), np.float16))
    with pytest.raises(FormatError, match="scales beside fp16 values"):
        pyeffort.load_buckets(path)
