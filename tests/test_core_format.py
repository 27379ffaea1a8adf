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


# ---------------------------------------------------------------- hardening (issue 18)


def raw_header(path, text: bytes):
    """Replace the header of ``path`` by ``text`` (padded), keeping the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def header_text(path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n].decode().rstrip()


SHAPE, OFFSETS, DTYPE = '"shape":[4800,', '"data_offsets":[0,', '"dtype":"F16"'


def sub(old: str, new: str):
    return lambda t: t.replace(old, new, 1)


CRAFTED = {
    "Infinity shape": sub(SHAPE, '"shape":[Infinity,'),
    "NaN offset": sub(OFFSETS, '"data_offsets":[NaN,'),
    "-Infinity offset": sub(OFFSETS, '"data_offsets":[-Infinity,'),
    "float shape": sub(SHAPE, '"shape":[4800.0,'),
    "1e400 shape": sub(SHAPE, '"shape":[1e400,'),
    "huge int": sub(SHAPE, '"shape":[' + "9" * 5000 + ","),
    "2**64 shape": sub(SHAPE, f'"shape":[{2**64},'),
    "bool shape": sub(SHAPE, '"shape":[true,'),
    "deep nesting": lambda t: "[" * 100000 + "]" * 100000,
    "nested shape": sub(SHAPE, '"shape":[' + "[" * 50 + "1" + "]" * 50 + ","),
    "a list": lambda t: "[" + t + "]",
    "a string": lambda t: '"hello"',
    "metadata a list": lambda t: sub("},", "}],")(sub('"__metadata__":{', '"__metadata__":[{')(t)),
    "dtype unknown": sub(DTYPE, '"dtype":"F8"'),
    "dtype a list": sub(DTYPE, '"dtype":["F16"]'),
    "extra key": sub(DTYPE, '"dtype":"F16","x":1'),
    "offsets out of file": sub(OFFSETS, '"data_offsets":[999999999,'),
    "three offsets": sub(OFFSETS, '"data_offsets":[0,0,'),
    "not utf-8": lambda t: "\udcff" + t,
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_raise_format_error(saved, case):
    """Every malformed header is a FormatError (an Infinity used to raise OverflowError, deep
    nesting RecursionError, a float or a list TypeError...)."""
    path, _, _ = saved
    text = CRAFTED[case](header_text(path))
    raw_header(path, text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FormatError):
        pyeffort.load_buckets(path)


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    """A FIFO used to block load_buckets forever: now FormatError at once (in a subprocess,
    so a hang is a timeout, not a stuck test run)."""
    import subprocess
    import sys

    os.mkfifo(tmp_path / "fifo")
    code = ("import pyeffort, sys\nfor p in sys.argv[1:]:\n    try:\n"
            "        pyeffort.load_buckets(p)\n    except pyeffort.FormatError as e:\n"
            "        print('refused', e)\n")  # fmt: skip
    paths = [str(tmp_path / "fifo"), "/dev/zero", str(tmp_path)]
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.stdout.count("refused") == 3, (r.stdout, r.stderr)


def strip_checksums(path):
    """The file as written before checksums existed."""
    corrupt_header(path, lambda h: [h["__metadata__"].pop(k) for k in list(h["__metadata__"])
                                    if k.startswith("crc32")])  # fmt: skip


@pytest.fixture
def narrow(tmp_path, rng):
    """n_out = 40: the last group holds 8 real outputs and 8 padding slots."""
    b = pyeffort.build_buckets(rng.standard_normal((50, 40)).astype(np.float16))
    path = tmp_path / "n.safetensors"
    b.save(path)
    return path, b


@pytest.mark.parametrize("n_out", ["33", "47", "39", "41"])
@pytest.mark.parametrize("checksums", [True, False])
def test_a_lying_n_out_is_refused(narrow, n_out, checksums):
    """A file whose n_out says 33 or 47 for 40 outputs used to load and drop or invent outputs.
    With checksums the header's own catches any edit; without them (older files) the padding
    check catches a smaller n_out, not a larger one (it claims outputs of zero weights)."""
    path, _ = narrow
    if not checksums:
        strip_checksums(path)
        if int(n_out) > 40:
            pytest.skip("undetectable without checksums: the claimed outputs are zero columns")
    corrupt_header(path, lambda h: _set(h, ["__metadata__", "n_out"], n_out))
    with pytest.raises(FormatError):
        pyeffort.load_buckets(path)


def test_files_without_checksums_still_load(narrow, rng):
    path, b = narrow
    strip_checksums(path)
    assert not any(k.startswith("crc32") for k in fileformat.Reader(path).metadata)
    x = rng.standard_normal(50).astype(np.float32)
    assert np.array_equal(pyeffort.matmul(x, pyeffort.load_buckets(path), 0.4),
                          pyeffort.matmul(x, b, 0.4))  # fmt: skip


def flip(path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_data_bit_flips_are_caught_by_the_checksums(saved, rng):
    """A flipped bit in the data used to load and change results silently (193 of 1,300)."""
    path, _, _ = saved
    r = fileformat.Reader(path)
    for name in ("values", "positions", "stats", "order"):
        t = r.info(name)
        at, bit = int(rng.integers(t.begin, t.begin + t.nbytes)), int(rng.integers(8))
        flip(path, at, bit)
        with pytest.raises(FormatError, match="checksum"):
            pyeffort.load_buckets(path)
        flip(path, at, bit)  # undone
    pyeffort.load_buckets(path)


def test_verify_false_skips_the_checksums(saved):
    path, b, _ = saved
    t = fileformat.Reader(path).info("values")
    flip(path, t.begin + 1, 7)  # the sign of the first value: still finite, distinct positions
    c = pyeffort.load_buckets(path, verify=False)  # trusted as it is
    assert c.values[0, 0] == -b.values[0, 0]


def test_partial_loads_verify_the_prefix_they_map(saved, rng):
    """A partial load checks the checksum blocks that cover its rows: a flip past them is not
    read and does not matter; one inside them is caught."""
    path, b, _ = saved
    t = fileformat.Reader(path).info("values")
    x = rng.standard_normal(300).astype(np.float32)
    want = pyeffort.matmul(x, pyeffort.load_buckets(path, fraction=0.2), 1.0)
    flip(path, t.begin + t.nbytes - 3)  # in the last rows
    c = pyeffort.load_buckets(path, fraction=0.2)
    assert np.array_equal(pyeffort.matmul(x, c, 1.0), want)
    with pytest.raises(FormatError, match="checksum"):
        pyeffort.load_buckets(path, fraction=1.0)
    flip(path, t.begin + t.nbytes - 3)
    flip(path, t.begin + 10)  # in the first rows
    with pytest.raises(FormatError, match="checksum"):
        pyeffort.load_buckets(path, fraction=0.2)


def test_non_finite_weights_in_a_file_are_refused(tmp_path, rng):
    """A file holding NaN/Inf weights (its checksums intact) used to load."""
    b = pyeffort.build_buckets(rng.standard_normal((40, 40)).astype(np.float16))
    values = b.values.copy()
    values[7, 1] = np.inf
    bad = pyeffort.Buckets(values, b.positions, b.stats, b.order, b.n_out, verify=False)
    bad.save(tmp_path / "inf.safetensors")
    with pytest.raises(FormatError, match="NaN or Inf"):
        pyeffort.load_buckets(tmp_path / "inf.safetensors")


def test_reader_maps_the_file_it_checked(saved, tmp_path, rng):
    """A file renamed over the path after opening (as every writer does) does not change what
    an open reader maps: it used to reopen the path, mapping the new file with the old
    header's offsets."""
    path, b, _ = saved
    r = fileformat.Reader(path)
    other = pyeffort.build_buckets(rng.standard_normal((300, 208)).astype(np.float16))
    other.save(path)
    np.testing.assert_array_equal(r.array("values"), b.values)
    np.testing.assert_array_equal(r.array("order", copy=True), b.order)


KILLED_WRITE = """
import sys, numpy as np
from pyeffort import fileformat
def slow():
    print("writing", flush=True)
    import time; time.sleep(60)
    return np.zeros(4, np.float32)
spec = fileformat.TensorSpec("t", np.dtype(np.float32), (4,), slow)
fileformat.write(sys.argv[1], [spec], {"format": "pyeffort"})
"""


def test_killed_writes_leave_temporaries_the_next_write_removes(tmp_path):
    """A writer killed by SIGKILL leaves its temporary; the next write into that folder
    recognises it (its pid is gone) and removes it. Temporaries of live writers stay."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "w.safetensors"
    cmd = [sys.executable, "-c", KILLED_WRITE, str(path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "writing\n"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and ".w.safetensors.pyeffort-tmp-" in left[0], left
    live = tmp_path / fileformat.temp_path(tmp_path / "other").name  # this process: alive
    live.write_bytes(b"")
    pyeffort.build_buckets(np.ones((20, 16), np.float16)).save(tmp_path / "x.safetensors")
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted([live.name, "x.safetensors"])


def test_reserved_metadata_keys_are_refused(tmp_path):
    spec = fileformat.TensorSpec("t", np.dtype(np.float32), (2,), lambda: np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="reserved"):
        fileformat.write(tmp_path / "t.safetensors", [spec], {"crc32": "0"})
