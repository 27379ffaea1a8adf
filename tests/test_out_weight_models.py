"""Per-output weights in the model loader: the shipped weights file of the default model, and
the converter building every matrix it names with them (stat rms_out_weighted)."""

import json

import numpy as np
import pytest

import pyeffort
from pyeffort import FormatError, fileformat
from pyeffort.buckets import STAT, STAT_OUT_WEIGHTED
from pyeffort.models import convert as cv
from pyeffort.models.args import tensor_shape
from pyeffort.models.profiles import out_weights as ow


def weights(rng, n_out):
    a = np.exp(1.5 * rng.standard_normal(n_out)).astype(np.float32)
    a[0] = 1.0
    return a


def test_weights_file_round_trip_and_checks(tmp_path):
    a = {"m.a": np.arange(4, dtype=np.float32), "m.b": np.ones(16, dtype=np.float32)}
    ow.save(a, tmp_path / "w.safetensors", {"seed": "0"})
    back = ow.load(tmp_path / "w.safetensors")
    assert set(back) == set(a) and all(np.array_equal(back[k], a[k]) for k in a)
    b = pyeffort.build_buckets(np.ones((4, 4), dtype=np.float16))
    b.save(tmp_path / "b.safetensors")
    with pytest.raises(FormatError, match="out_weights"):
        ow.load(tmp_path / "b.safetensors")


def test_shipped_weights_fit_the_default_model():
    from pyeffort.models import config
    from pyeffort.models.default import CACHE_NAME, GGUF_NAME
    from pyeffort.models.loaders import matrix_names

    path = ow.shipped(GGUF_NAME)
    assert path is not None and ow.shipped(f"/x/{CACHE_NAME}/") == path
    assert path.stat().st_size < 1_000_000
    args = config("SmolLM2-135M")
    shapes = {n: tensor_shape(args, n) for n in matrix_names(args)}
    a = ow.for_model(GGUF_NAME, shapes)
    assert a is not None and len(a) == 210
    for n, v in a.items():
        assert np.isfinite(v).all() and (v >= 0).all() and abs(v.mean() - 1) < 1e-3, n
    assert ow.for_model("some-other-model.gguf", shapes) is None
    shapes["layers.0.attn.wq"] = (576, 512)  # a model whose shapes differ gets none
    assert ow.for_model(GGUF_NAME, shapes) is None


def test_convert_builds_with_the_weights(tmp_path, monkeypatch, rng):
    """convert(..., out_weights=dict) writes rms_out_weighted matrices that load as built;
    matrices the dict does not name stay plain."""
    from pyeffort.models import load
    from pyeffort.models.loaders import matrix_names
    from pyeffort.eval import tiny

    m = tiny.tiny_random()
    args = m.args
    dense = {lin.name: lin.buckets.to_dense() for lin in m.linears()}

    class Src:  # a source as loaders.open_source gives: args, get(name), tokenizer
        def __init__(self):
            self.args = args
            self.tokenizer = type("T", (), {"save": staticmethod(lambda p: None)})()

        def get(self, n):
            if n in dense:
                return dense[n].astype(np.float32)
            return m.embed if n == "embed" else np.ones(args.dim, np.float32)

    monkeypatch.setattr(cv, "open_source", lambda p: Src())
    names = matrix_names(args)
    a = {n: weights(rng, tensor_shape(args, n)[1]) for n in names[:5]}
    dst = cv.convert("tiny.gguf", tmp_path / "tiny", progress=False, out_weights=a)
    meta = fileformat.Reader(dst / "layers.000.safetensors").metadata
    assert meta[names[0] + ".stat"] == STAT_OUT_WEIGHTED and meta[names[6] + ".stat"] == STAT
    monkeypatch.setattr(cv.Tokenizer, "load", staticmethod(lambda p: None))
    got = {lin.name: lin.buckets for lin in load(dst).linears()}
    for n in names:
        want = pyeffort.build_buckets(dense[n], a.get(n))
        assert got[n].stat == want.stat, n
        np.testing.assert_array_equal(np.asarray(got[n].positions), want.positions)
        np.testing.assert_array_equal(np.asarray(got[n].values), want.values)
    with pytest.raises(ValueError, match="built already"):
        load(dst, out_weights=None)
    with pytest.raises(ValueError, match="'auto', None or a dict"):
        cv.out_weights_for("x", args, "fisher")
    assert json.loads((dst / cv.MANIFEST).read_text())["kind"] == "model"


def test_eval_labels_the_plain_build_apart():
    """pyeffort eval --out-weights none: the rows are (e'), never taken for the default in the
    equal-effort verdict."""
    from pyeffort.eval import report

    plain = report.label("pyeffort", True, plain=True)
    assert plain.startswith("(e')") and "plain RMS" in plain
    rows = []
    for lb, scale in ((plain, 0.1), (report.label("pyeffort", True), 2.0), ("(a) x", 1.0)):
        rows += [{"rule": "r", "label": lb, "realised": e, "kl": scale / e} for e in (0.2, 0.4)]
    table = report.equal_effort(rows, [0.3])
    assert table.strip().endswith("| NO |")  # (e) above (a): the (e') rows do not count


def test_eval_reports_the_statistic(tmp_path):
    """pyeffort eval writes which statistic the model's matrices were built with; --out-weights
    none on a model without shipped weights is the plain build, labelled as the default."""
    from pyeffort.eval import cli

    src = tmp_path / "text.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    argv = ["--tiny", "--text", str(src), "--rules", "pyeffort", "--efforts", "0.5"]
    argv += ["--windows", "1", "--length", "32", "--no-progress", "--profile", "uniform"]
    assert cli.main(argv + ["--out", str(tmp_path / "o"), "--out-weights", "none"]) == 0
    data = json.loads((tmp_path / "o" / "quality.json").read_text())
    assert data["meta"]["stats"] == [STAT]
    assert data["results"][0]["label"].startswith("(e) ")
