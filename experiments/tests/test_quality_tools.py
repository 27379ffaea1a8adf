"""The research tools of experiments/quality that the product's harness does not run: the
budget-split calibration and the torch twin (cheap checks on tiny or random inputs)."""

from __future__ import annotations

import json

import calibrate
import numpy as np
import pytest

import pyeffort
from pyeffort.eval import rules
from pyeffort.eval.harness import Harness, windows
from pyeffort.eval.tiny import tiny_random
from pyeffort.models.profiles import allocation


def test_calibrated_split_keeps_the_total():
    m = tiny_random(seed=0)
    ids = np.random.default_rng(0).integers(0, m.args.vocab_size, 400)
    h = Harness(m, windows(ids, 1, 32), progress=False)
    prof = calibrate.calibrate(h, ids, n_windows=1, length=32, efforts=(0.2, 0.5), progress=False)
    h.allocation = allocation.Allocation(h.allocation.names, h.allocation.sizes, prof)
    r = h.run("pyeffort", 0.3)
    assert abs(r.realised - 0.3) < 0.01
    per = h.allocation.efforts(0.3)
    assert len(set(np.round(list(per.values()), 6))) > 1  # the split is not uniform


@pytest.mark.parametrize("weighted", [False, True])
def test_torch_twin_matches_the_numpy_twin(weighted):
    """The twin selects as ``pyeffort.matmul`` does, plain or with ``out_weight`` as
    ``build_buckets(W, out_weight=a)`` (the budget split for the shipped statistic is solved on
    it)."""
    torch = pytest.importorskip("torch")
    from torch_twin import TwinMatrix

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 64)) * 0.1).astype(np.float16)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    x[:, :4] *= 8.0
    a = rng.gamma(0.5, 2.0, 64).astype(np.float32) if weighted else None
    st = rules.MatrixState(w, buckets=pyeffort.build_buckets(w, out_weight=a))
    tm, plain = TwinMatrix("m", w, "cpu", a), TwinMatrix("m", w, "cpu")
    assert np.array_equal(plain.stats.numpy(), rules.MatrixState(w).row_stats("rms"))
    assert np.array_equal(tm.stats.numpy(), plain.stats.numpy()) == (not weighted)
    for e in (0.1, 0.3, 0.7):
        y, mults, _ = rules.bucket_twin(x, st, e)
        yt, mt = tm(torch.from_numpy(x), e)
        assert mt == mults
        np.testing.assert_allclose(yt.numpy(), y, rtol=1e-5, atol=1e-5)


def test_torch_twin_puts_qk_weights_in_gguf_order():
    """The shipped weights follow the loader's de-interleaved q/k rows; the twin's GGUF rows
    are interleaved, so ``a`` is interleaved back (the loader's ``unpermute`` undoes it)."""
    pytest.importorskip("torch")
    from pyeffort.models.loaders.gguf import unpermute
    from torch_twin import TwinLlama

    twin = TwinLlama.__new__(TwinLlama)
    twin.n_heads, twin.n_kv = 3, 1
    a = np.arange(3 * 8, dtype=np.float32)
    g = twin._gguf_order("layers.0.attn.wq", a)
    np.testing.assert_array_equal(unpermute(g[:, None], 3)[:, 0], a)
    k = twin._gguf_order("layers.0.attn.wk", a[:8])
    assert not np.array_equal(k, a[:8])
    np.testing.assert_array_equal(unpermute(k[:, None], 1)[:, 0], a[:8])
    assert twin._gguf_order("layers.0.ffn.w1", a) is a


def test_calibrate_command_writes_a_profile_eval_reads(tmp_path):
    from pyeffort.eval import cli

    src = tmp_path / "text.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    prof = tmp_path / "p.json"
    argv = ["--tiny", "--text", str(src), "--windows", "1", "--length", "32", "--no-progress"]
    assert calibrate.main(argv + ["--out", str(prof)]) == 0
    assert set(allocation.load(prof)["efforts"]) == set(calibrate.EFFORTS)
    argv = ["--tiny", "--text", str(src), "--rules", "pyeffort", "--efforts", "0.3"]
    argv += ["--windows", "1", "--length", "32", "--no-progress", "--profile", str(prof)]
    assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 0
    (r,) = json.loads((tmp_path / "o" / "quality.json").read_text())["results"]
    assert r["label"].endswith("+ budget split") and abs(r["realised"] - 0.3) < 0.01
