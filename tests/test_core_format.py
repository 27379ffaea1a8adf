"""The file format: round trip, partial loading, atomic writes, and every malformed file."""

import json
import os
import struct

import numpy as np
import pytest

import pyeffort
from pyeffort import FormatError, fileformat


@pytest.fixture
def saved(tmp_path, rng):
    w = rng.standard_normal((300, 208)).astype(np.float16)  # no padding: bytes ~ mults
    b = pyeffort.build_buckets(w)
    path = tmp_path / "w.safetensors"
    b.save(path)
    return path, b, w


def test_round_trip(saved, rng):
    path, b, _w = saved
    c = pyeffort.load_buckets(path)
    for name in ["values", "positions", "stats", "order"]:
        np.testing.assert_array_equal(getattr(c, name), getattr(b, name))
    x = rng.standard_normal(300).astype(np.float32)
    assert np.array_equal(pyeffort.matmul(x, c, 0.3), pyeffort.matmul(x, b, 0.3))
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temporary left


def test_saved_file_has_the_umask_mode(tmp_path):
    """Written through a temporary file (mkstemp: 0600), the file still gets what open() would
    give it, so a saved matrix or converted model is readable by whoever the umask allows."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "w.safetensors"
        pyeffort.build_buckets(np.ones((20, 16), np.float16)).save(path)
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        pyeffort.build_buckets(np.ones((20, 16), np.float16)).save(path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_umask_read_without_setting_it(tmp_path, monkeypatch):
    """The umask comes from /proc/self/status (the value os.umask reports), so reading it never
    changes it, not even for a moment."""
    from pyeffort import fileformat

    old = os.umask(0o027)
    try:
        assert fileformat.current_umask() == 0o027
        calls = []
        monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or 0o027)
        assert fileformat.default_mode(0o666) == 0o640
        if os.path.exists("/proc/self/status"):
            assert calls == []  # Linux: read, never set
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_safetensors_library_reads_our_files(saved):
    from safetensors.numpy import load_file

    path, b, _ = saved
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["values"], b.values)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.7, 1.0])
def test_partial_load_maps_only_the_kept_rows(saved, rng, fraction):
    path, b, w = saved
    c = pyeffort.load_buckets(path, fraction=fraction)
    assert abs(c.loaded_fraction - fraction) < 0.01
    assert isinstance(c.values, np.memmap) and isinstance(c.positions, np.memmap)
    # the mapped bytes are the kept rows only: they scale with the fraction
    mapped = c.values.nbytes + c.positions.nbytes
    assert mapped == c.n_rows * (b.nbytes // b.n_rows)
    assert abs(mapped / b.nbytes - fraction) < 0.01
    np.testing.assert_array_equal(c.values, b.values[: c.n_rows])
    x = rng.standard_normal(300).astype(np.float32)
    y, info = pyeffort.matmul(x, c, 1.0, return_info=True)
    assert info.effort == pytest.approx(c.loaded_fraction)
    # what is loaded is the most important part: better than dropping rows at random
    exact = x @ w.astype(np.float32)
    assert np.corrcoef(y, exact)[0, 1] > 0.5 or fraction <= 0.1


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_partial_load_resident_memory_scales(tmp_path, rng):
    """File pages this process holds after using a partial load scale with the fraction."""
    w = rng.standard_normal((4096, 1024)).astype(np.float16)
    path = tmp_path / "big.safetensors"
    pyeffort.build_buckets(w).save(path)
    grown = {}
    pyeffort.matmul(np.ones(4096, dtype=np.float32), pyeffort.load_buckets(path, fraction=0.0), 1)
    for f in [0.25, 1.0]:
        before = rss_file_kib()
        c = pyeffort.load_buckets(path, fraction=f)
        pyeffort.matmul(np.ones(4096, dtype=np.float32), c, 1.0)  # touches every kept row
        grown[f] = rss_file_kib() - before
        del c
    assert grown[1.0] > 8000  # ~10 MiB of bucket rows
    assert grown[0.25] / grown[1.0] == pytest.approx(0.25, abs=0.05)


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")

    def boom():
        raise RuntimeError("producer failed")

    spec = fileformat.TensorSpec("t", np.dtype(np.float32), (2,), boom)
    with pytest.raises(RuntimeError):
        fileformat.write(path, [spec], {"format": "pyeffort"})
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def corrupt_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _set(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


BAD_HEADERS = {
    "version": lambda h: _set(h, ["__metadata__", "version"], "99"),
    "foreign": lambda h: _set(h, ["__metadata__", "format"], "gguf"),
    "no-meta": lambda h: h.pop("__metadata__"),
    "dtype": lambda h: _set(h, ["values", "dtype"], "F32"),
    "shape": lambda h: _set(h, ["stats", "shape"], [16, 299]),
    "offsets": lambda h: _set(h, ["values", "data_offsets"], [0, 10**12]),
    "bad-int": lambda h: _set(h, ["__metadata__", "n_in"], "many"),
    "missing": lambda h: h.pop("order"),
    "overlap": lambda h: _set(h, ["order", "data_offsets"], h["stats"]["data_offsets"]),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_headers_raise_format_error(saved, case):
    path, _, _ = saved
    corrupt_header(path, BAD_HEADERS[case])
    with pytest.raises(FormatError):
        pyeffort.load_buckets(path)


def test_bad_contents_raise_format_error(saved):
    path, _b, _ = saved
    reader = fileformat.Reader(path)
    t = reader.info("order")
    raw = bytearray(path.read_bytes())
    raw[t.begin : t.begin + 4] = struct.pack("<i", 10**6)  # an input index out of range
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="order"):
        pyeffort.load_buckets(path)


@pytest.mark.parametrize("cut", [0, 3, 8, 20, 500, -1])
def test_truncated_files_raise_format_error(saved, cut):
    path, _, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:-1])
    with pytest.raises(FormatError):
        pyeffort.load_buckets(path)


def test_foreign_and_missing_files(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError):
        pyeffort.load_buckets(p)
    p.write_bytes(b"")
    with pytest.raises(FormatError):
        pyeffort.load_buckets(p)
    with pytest.raises(FormatError):
        pyeffort.load_buckets(tmp_path / "does-not-exist.safetensors")
    with pytest.raises(FormatError):
        pyeffort.load_buckets(tmp_path)  # a folder
