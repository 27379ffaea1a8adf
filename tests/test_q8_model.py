"""Converted models with q8 matrices (``pyeffort convert --values q8``): the manifest records the
value kind, load_converted reads q8 and f16 folders (version-1 folders too), ``info`` shows the
value kind and the bytes per multiplication, and a tiny q8 model generates text."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from test_cli import cli
from test_model_hf import write_tiny_mistral

import pyeffort
from pyeffort import FormatError, _backend, api, fileformat
from pyeffort.models import convert as cv
from pyeffort.models.generate import generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("q8model")
    write_tiny_mistral(root / "hf")
    f16 = cv.convert(root / "hf", root / "f16", progress=False)
    return cv.convert(root / "hf", root / "q8", progress=False, values="q8"), f16


@pytest.fixture
def numpy_backend():
    previous = _backend.use("numpy")
    yield
    _backend.current = previous


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_the_manifest_and_the_files_record_the_value_kind(tiny):
    q8, f16 = tiny
    for path, kind in ((q8, "q8"), (f16, "f16")):
        m = json.loads((path / cv.MANIFEST).read_text())
        assert m["version"] == 2 and m["values"] == kind
        r = fileformat.Reader(path / "layers.001.safetensors")
        assert r.metadata["version"] == "2" and r.metadata["layers.1.ffn.w2.values"] == kind
        model = cv.load_converted(path)
        assert {lin.buckets.values_kind for lin in model.linears()} == {kind}
    tensors = fileformat.Reader(q8 / "layers.000.safetensors").tensors
    assert tensors["layers.0.attn.wq.values"].dtype == np.int8
    assert tensors["layers.0.attn.wq.scales"].dtype == np.float16


def test_a_tiny_q8_model_generates_text(tiny, backend):
    m = cv.load_converted(tiny[0])
    ids = m.tokenizer.encode("the cat sat")
    for effort in (1.0, 0.5):
        out = list(generate(m, ids, max_tokens=8, effort=effort, stop=[]))
        assert len(out) == 8 and m.tokenizer.decode(out).strip()


def test_q8_logits_follow_the_f16_models(tiny, numpy_backend):
    q8, f16 = (cv.load_converted(p) for p in tiny)
    for effort, least in ((1.0, 0.999), (0.5, 0.99)):
        a, b = q8.forward([1, 5, 9, 3], 0, effort), f16.forward([1, 5, 9, 3], 0, effort)
        q8.reset()
        f16.reset()
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > least, (effort, cos)


def test_a_partial_q8_load(tiny, numpy_backend):
    m = cv.load_converted(tiny[0], fraction=0.5)
    for lin in m.linears():
        b = lin.buckets
        assert abs(b.loaded_fraction - 0.5) < 0.02 and b.values_kind == "q8"
    assert np.isfinite(m.forward([1, 2, 3], 0, 0.3)).all()


def test_the_effort_head_follows_the_models_value_kind(tiny):
    for path, kind in zip(tiny, ("q8", "f16")):
        m = cv.load_converted(path)
        m.effort_head(True)
        assert m.head.buckets.values_kind == kind


# ---------------------------------------------------------------- the command line


def test_cli_convert_values_and_info(tiny, tmp_path):
    hf = tiny[0].parent / "hf"
    r = cli("convert", str(hf), str(tmp_path / "m"), "--no-progress", "--values", "q8")
    assert r.returncode == 0 and "q8 values" in r.stdout, r.stderr
    r = cli("info", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "(128, 64) buckets, q8 values, 1.625 bytes per multiplication" in r.stdout
    lins = list(cv.load_converted(tmp_path / "m").linears())
    per = sum(lin.buckets.nbytes for lin in lins) / sum(np.prod(lin.shape) for lin in lins)
    assert 1.625 < per < 1.7 and f"values q8: {per:.3f} bytes per multiplication" in r.stdout
    r = cli("convert", str(hf), str(tmp_path / "n"), "--values", "q4")
    assert r.returncode == 2 and "--values" in r.stderr and not (tmp_path / "n").exists()


def test_cli_generates_with_a_q8_model(tiny):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYEFFORT_BACKEND": "numpy"}  # any backend with q8 kernels
    r = subprocess.run([sys.executable, "-m", "pyeffort", "generate", "the cat sat", "--model",
                        str(tiny[0]), "--max-tokens", "6", "--effort", "0.5"],
                       capture_output=True, text=True, timeout=120, env=env, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "realised 0.5" in r.stderr


# ---------------------------------------------------------------- version 1 and damage


def edit_header(path, edit) -> None:
    """Rewrites a safetensors file's header through ``edit(header)``, checksum refitted."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    header["__metadata__"]["crc32"] = fileformat.header_crc(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def edit_manifest(path, edit) -> None:
    m = json.loads((path / cv.MANIFEST).read_text())
    edit(m)
    m["crc32"] = cv._manifest_crc(m)
    (path / cv.MANIFEST).write_text(json.dumps(m, indent=1))


def as_version_1(header) -> None:
    meta = header["__metadata__"]
    meta["version"] = "1"
    for k in [k for k in meta if k.endswith(".values") and not k.startswith("crc32")]:
        del meta[k]


def test_a_version_1_folder_loads_and_runs_unchanged(tiny, tmp_path):
    old = copy(tiny[1], tmp_path / "v1")
    for f in old.glob("*.safetensors"):
        edit_header(f, as_version_1)
    edit_manifest(old, lambda m: (m.update(version=1), m.pop("values")))
    assert "values" not in (old / cv.MANIFEST).read_text()
    a, b = cv.load_converted(old), cv.load_converted(tiny[1])
    np.testing.assert_array_equal(a.forward([4, 2, 7], 0, 0.4), b.forward([4, 2, 7], 0, 0.4))
    r = cli("info", str(old))
    assert r.returncode == 0 and "format version 1" in r.stdout and "values f16" in r.stdout


def set_values(kind):
    return lambda m: m.update(values=kind)


DAMAGE = {
    "manifest values f16, files q8": (set_values("f16"), None, "has q8 values, the manifest f16"),
    "manifest values q4": (set_values("q4"), None, "manifest values='q4' is not one of"),
    "manifest values missing": (lambda m: m.pop("values"), None, "values=None is not one of"),
    "values in a version-1 manifest": (lambda m: m.update(version=1), None, "version-1 manifest"),
    "a file of another version": (None, as_version_1, "version '1' in a version 2 model"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_q8_folders_are_format_errors(tiny, tmp_path, case):
    manifest, header, message = DAMAGE[case]
    path = copy(tiny[0], tmp_path / "m")
    if manifest is not None:
        edit_manifest(path, manifest)
    if header is not None:
        edit_header(path / "layers.001.safetensors", header)
    with pytest.raises(FormatError, match=message):
        cv.load_converted(path)
