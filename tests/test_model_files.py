"""Converted model folders: what loading checks (files, layers, shapes, config, checksums) and
how conversions clean up after a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_model_hf import write_tiny_mistral

from pyeffort import FormatError, fileformat
from pyeffort.models import convert as cv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    write_tiny_mistral(root / "hf", n_layers=2)
    return cv.convert(root / "hf", root / "conv", progress=False)


@pytest.fixture
def model(tiny, tmp_path):
    """A fresh copy to damage."""
    return shutil.copytree(tiny, tmp_path / "m")


def logits(path, **kw):
    return cv.load_converted(path, **kw).forward([1, 5, 9])


def edit_manifest(path, edit, fix_crc=True):
    m = json.loads((path / cv.MANIFEST).read_text())
    edit(m)
    if fix_crc:  # a consistent manifest: what the checks behind its checksum must catch
        m["crc32"] = cv._manifest_crc(m)
    (path / cv.MANIFEST).write_text(json.dumps(m))


def test_round_trip_and_verify_switch(model):
    a = logits(model)
    assert np.array_equal(a, logits(model, verify=False))
    assert np.isfinite(a).all()


@pytest.mark.parametrize("n_layers", [1, 3])
def test_n_layers_must_match_the_files(model, n_layers):
    """n_layers=1 on a 2-layer model used to load one layer silently."""
    edit_manifest(model, lambda m: m["config"].update(n_layers=n_layers))
    with pytest.raises(FormatError):
        cv.load_converted(model)


def test_files_must_be_those_of_the_layers(model):
    edit_manifest(model, lambda m: m["files"].append("layers.001.safetensors"))
    with pytest.raises(FormatError, match="files"):
        cv.load_converted(model)


def rewrite(path, edit_tensors=None, edit_meta=None):
    """Rewrite a model file through the writer (valid checksums) with edited contents."""
    r = fileformat.Reader(path)
    arrays = {n: r.array(n, copy=True) for n in r.tensors}
    meta = {k: v for k, v in r.metadata.items() if not k.startswith("crc32")}
    r.close()
    if edit_tensors:
        edit_tensors(arrays)
    if edit_meta:
        edit_meta(meta)
    specs = [fileformat.TensorSpec(n, a.dtype, a.shape, lambda a=a: a) for n, a in arrays.items()]
    fileformat.write(path, specs, meta)


def test_a_shrunk_embedding_is_refused(model):
    """An embedding of fewer rows than vocab_size used to load (token ids past it then fail
    late, or index another row)."""
    rewrite(model / "main.safetensors", lambda t: t.update(embed=t["embed"][:-7]))
    with pytest.raises(FormatError, match="embed"):
        cv.load_converted(model)


def test_a_matrix_of_the_wrong_shape_is_refused(model, tmp_path):
    """Matrices that are not of the config's shapes (a config of a smaller FFN)."""
    other = tmp_path / "other"
    write_tiny_mistral(other / "hf", n_layers=1)
    src = cv.convert(other / "hf", other / "conv", progress=False)
    m = json.loads((src / cv.MANIFEST).read_text())
    m["config"]["hidden_dim"] = 96  # a smaller FFN: the files hold 128
    m["crc32"] = cv._manifest_crc(m)
    (src / cv.MANIFEST).write_text(json.dumps(m))
    config = json.dumps(m["config"])
    rewrite(src / "main.safetensors", edit_meta=lambda meta: meta.update(config=config))
    with pytest.raises(FormatError, match="expected"):
        cv.load_converted(src)


def test_non_finite_weights_are_refused(model):
    def poison(t):
        t["norm"] = t["norm"].copy()
        t["norm"][3] = np.nan

    rewrite(model / "main.safetensors", poison)
    with pytest.raises(FormatError, match="NaN"):
        cv.load_converted(model)
    cv.load_converted(model, verify=False)  # trusted


def test_a_layer_file_in_the_wrong_place_is_refused(model):
    os.replace(model / "layers.001.safetensors", model / "layers.000.safetensors")
    shutil.copy(model / "layers.000.safetensors", model / "layers.001.safetensors")
    with pytest.raises(FormatError):
        cv.load_converted(model)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(config={**m["config"], "norm_eps": 1e-3}),  # silently other results
        lambda m: m.update(config={**m["config"], "rope_theta": 10001.0}),
        lambda m: m.update(config={**m["config"], "dim": "64"}),
        lambda m: m.update(config={**m["config"], "n_heads": 0}),
        lambda m: m.update(files="main.safetensors"),
        lambda m: m.update(checksums={"../../etc/passwd": "00000000"}),
    ],
)
def test_manifest_edits_are_refused(model, edit):
    edit_manifest(model, edit)
    with pytest.raises(FormatError):
        cv.load_converted(model)


@pytest.mark.parametrize("text", ["[1, 2]", "{", '{"format": NaN}', "[" * 100000, ""])
def test_malformed_manifests_are_refused(model, text):
    (model / cv.MANIFEST).write_text(text)
    with pytest.raises(FormatError):
        cv.load_converted(model)


def test_manifest_and_tokenizer_bit_flips_are_caught(model):
    for name in (cv.MANIFEST, "tokenizer.model", "pyeffort_tokenizer.json"):
        raw = bytearray((model / name).read_bytes())
        at = len(raw) // 2
        raw[at] ^= 0x04
        (model / name).write_bytes(bytes(raw))
        with pytest.raises(FormatError):
            cv.load_converted(model)
        raw[at] ^= 0x04
        (model / name).write_bytes(bytes(raw))
    cv.load_converted(model)


def test_older_folders_without_checksums_still_load(model):
    a = logits(model)
    edit_manifest(model, lambda m: [m.pop("crc32"), m.pop("checksums")], fix_crc=False)
    for f in model.glob("*.safetensors"):
        rewrite_without_checksums(f)
    assert np.array_equal(logits(model), a)


def rewrite_without_checksums(path):
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    h["__metadata__"] = {k: v for k, v in h["__metadata__"].items() if not k.startswith("crc32")}
    blob = json.dumps(h).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


KILLED_CONVERT = """
import sys, time
from pyeffort.models import convert as cv
real = cv.fileformat.write
def slow(path, *a, **kw):
    real(path, *a, **kw)
    if "layers.000" in str(path):
        print("converting", flush=True)
        time.sleep(60)
cv.fileformat.write = slow
cv.convert(sys.argv[1], sys.argv[2], progress=False, overwrite=True)
"""


def test_a_killed_conversion_is_cleaned_by_the_next(tiny, tmp_path):
    """SIGKILL mid-conversion leaves a temporary folder (669 MiB for the issue's six); the next
    conversion into the same parent removes it, and the finished folder follows the umask."""
    hf, dst = tiny.parent / "hf", tmp_path / "conv"
    p = subprocess.Popen([sys.executable, "-c", KILLED_CONVERT, str(hf), str(dst)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline() == "converting\n"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".conv.pyeffort-tmp-"), left
    old = os.umask(0o022)
    try:
        cv.convert(hf, dst, progress=False)
    finally:
        os.umask(old)
    assert [q.name for q in tmp_path.iterdir()] == ["conv"]
    assert dst.stat().st_mode & 0o777 == 0o755
    cv.load_converted(dst)
