"""``pyeffort eval``: selection rules on random matrices, the budget split, and the whole
harness on a tiny random model (seconds)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort.eval import rules
from pyeffort.eval.harness import Harness, windows
from pyeffort.eval.tiny import tiny_random
from pyeffort.models.profiles import allocation


@pytest.fixture(scope="module")
def mat():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((96, 80)) * 0.1).astype(np.float16)
    x = rng.standard_normal((12, 96)).astype(np.float32)
    x[:, :3] *= 8.0  # outlier channels, as in real activations
    return rules.MatrixState(w, name="layers.0.ffn.w1"), x


def _cos(y, ex):
    return float(np.mean((y * ex).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ex, axis=1)))


@pytest.mark.parametrize("name", ["pyeffort", "bucket_twin", "original_exact", "teal", "wina"])
@pytest.mark.parametrize("effort", [0.1, 0.25, 0.5])
def test_rules_realise_the_asked_effort(mat, name, effort):
    st, x = mat
    _, mults, nbytes = rules.RULES[name](x, st, effort)
    realised = mults / (x.shape[0] * st.size)
    # channel rules round to whole channels; bucket rules to whole rows (+ ties)
    assert abs(realised - effort) < 1.0 / st.n_in + 1e-9
    assert nbytes > 0


def test_oracle_realises_close_to_the_effort_and_beats_buckets(mat):
    st, x = mat
    ex = x @ st.w32
    for effort in (0.1, 0.3):
        y, mults, _ = rules.oracle_rule(x, st, effort)
        assert abs(mults / (x.shape[0] * st.size) - effort) < 0.02
        yb, _, _ = rules.bucket_twin(x, st, effort)
        assert np.linalg.norm(y - ex) <= np.linalg.norm(yb - ex) * 1.05


def test_twin_matches_pyeffort_matmul(mat):
    st, x = mat
    for effort in (0.05, 0.3, 0.77):
        y1, m1, b1 = rules.pyeffort_rule(x, st, effort)
        y2, m2, b2 = rules.bucket_twin(x, st, effort)
        assert (m1, b1) == (m2, b2)
        np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4 * np.abs(y1).max())


@pytest.mark.parametrize("name", ["pyeffort", "bucket_twin", "teal", "wina", "oracle"])
def test_full_effort_is_the_dense_product(mat, name):
    st, x = mat
    y, mults, _ = rules.RULES[name](x, st, 1.0)
    assert mults == x.shape[0] * st.size
    np.testing.assert_allclose(y, x @ st.w32, rtol=1e-4, atol=1e-4)


def test_cosine_rises_with_effort_and_truncation_biases(mat):
    st, x = mat
    ex = x @ st.w32
    for name in ("pyeffort", "teal", "wina", "original", "oracle"):
        c = [_cos(rules.RULES[name](x, st, e)[0], ex) for e in (0.1, 0.3, 0.6)]
        assert c[0] < c[1] < c[2], (name, c)
    y, _, _ = rules.original_exact_rule(x, st, 1.0)  # positions in the mantissa: not exact
    assert np.abs(y - ex).max() > 1e-3 * np.abs(ex).max()
    y8, mults, _nbytes = rules.int8_rule(x, st, 0.3)
    assert mults == x.shape[0] * st.size and 0.999 < _cos(y8, ex) < 1.0


def test_original_probes_miss_the_effort():
    rng = np.random.default_rng(3)
    st = rules.MatrixState((rng.standard_normal((256, 128)) * 0.05).astype(np.float16))
    x = (rng.standard_normal((8, 256)) * np.exp(rng.standard_normal(256))).astype(np.float32)
    per_token = [rules.original_rule(x[t : t + 1], st, 0.25)[1] / st.size for t in range(8)]
    assert max(abs(np.array(per_token) - 0.25)) > 0.005  # why we compare at realised effort
    exact = [rules.bucket_twin(x[t : t + 1], st, 0.25)[1] / st.size for t in range(8)]
    assert max(abs(np.array(exact) - 0.25)) < 1.0 / 256


def test_allocation_adds_up_to_the_user_effort():
    names = [f"layers.{i}.{t}" for i in range(3) for t in ("attn.wq", "ffn.w2")]
    sizes = [100, 400] * 3
    prof = {"efforts": [0.2, 0.6], "weights": {"attn.wq": [0.2, 0.5], "ffn.w2": [3.0, 1.5]}}
    a = allocation.Allocation(names, sizes, prof)
    for e in (0.1, 0.2, 0.35, 0.6, 0.9):
        eff = a.efforts(e)
        total = sum(eff[n] * s for n, s in zip(names, sizes)) / sum(sizes)
        assert abs(total - e) < 1e-9 and max(eff.values()) <= 1.0
        assert eff["layers.0.attn.wq"] < eff["layers.0.ffn.w2"]
    assert allocation.matrix_type("layers.12.attn.wv") == "attn.wv"


@pytest.fixture(scope="module")
def tiny():
    m = tiny_random(seed=0)
    ids = np.random.default_rng(0).integers(0, m.args.vocab_size, 400)
    return m, ids


def test_harness_on_a_tiny_model(tiny):
    m, ids = tiny
    h = Harness(m, windows(ids, 2, 48), progress=False)
    kls = []
    for e in (0.15, 0.3, 0.6):
        r = h.run("pyeffort", e)
        assert abs(r.realised - e) < 0.01
        kls.append(r.kl)
    assert kls[0] > kls[1] > kls[2] > 0
    full = h.run("pyeffort", 1.0)
    assert full.kl < 1e-4 and full.top1 == 1.0 and abs(full.realised - 1.0) < 1e-12
    teal = h.run("teal", 0.3)
    assert abs(teal.realised - 0.3) < 0.02 and teal.kl > 0
    assert abs(full.ppl - h.exact_ppl()) < 1e-3 * h.exact_ppl()


def test_eval_cli_on_a_tiny_model(tmp_path, capsys):
    from pyeffort.eval import cli

    src = tmp_path / "text.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--tiny",
            "--text",
            str(src),
            "--rules",
            "pyeffort,teal,int8",
            "--efforts",
            "0.25,1.0",
            "--windows",
            "2",
            "--length",
            "32",
            "--out",
            str(out),
            "--no-progress",
            "--profile",
            "uniform",
            "--speed",
        ]
    )
    assert rc == 0
    data = json.loads((out / "quality.json").read_text())
    kl = {(r["rule"], r["effort"]): r["kl"] for r in data["results"]}
    assert kl[("pyeffort", 1.0)] < 1e-4 < kl[("pyeffort", 0.25)]
    assert ("int8", 1.0) in kl
    md = (out / "quality.md").read_text()
    assert "| rule |" in md and "| speed-up |" in md
    assert all(r["speedup"] > 0 for r in data["results"] if r["rule"] in ("pyeffort", "teal"))
    with pytest.raises(SystemExit):
        cli.main(["--tiny", "--text", str(src), "--rules", "nope", "--out", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["--tiny", "--text", str(src), "--efforts", "1.5", "--out", str(out)])


def test_eval_windows_start_at_a_token_or_at_a_marker(tmp_path):
    from pyeffort.eval import cli

    src = tmp_path / "text.txt"
    src.write_text("HEADER " * 30 + "STORY the quick brown fox jumps over the lazy dog. " * 20)
    starts = {}
    for start in ("0", "17", "STORY"):
        out = tmp_path / start
        argv = ["--tiny", "--text", str(src), "--rules", "teal", "--efforts", "0.5"]
        argv += ["--windows", "2", "--length", "32", "--out", str(out), "--no-progress"]
        assert cli.main(argv + ["--start", start]) == 0
        meta = json.loads((out / "quality.json").read_text())["meta"]
        starts[start] = meta["start"]
        assert f"from token {meta['start']}" in (out / "quality.md").read_text()
    assert starts == {"0": 0, "17": 17, "STORY": 7 * 30}  # the tiny model: a token per byte
    with pytest.raises(SystemExit, match="does not occur"):
        cli.main(["--tiny", "--text", str(src), "--start", "CHAPTER IX", "--out", str(tmp_path)])


def test_windows_are_consecutive_and_checked():
    ids = np.arange(1000)
    np.testing.assert_array_equal(windows(ids, 2, 100, 50), ids[50:250].reshape(2, 100))
    with pytest.raises(ValueError, match="need 1500 tokens"):
        windows(ids, 5, 300)


def test_eval_needs_a_readable_utf8_text(tmp_path):
    from pyeffort.eval import cli

    with pytest.raises(SystemExit):  # argparse: --text is required
        cli.main(["--tiny", "--out", str(tmp_path)])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(SystemExit, match="not UTF-8"):
        cli.main(["--tiny", "--text", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot read"):
        cli.main(["--tiny", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_botchan_is_fetched_from_the_sentencepiece_sdist(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "scripts"))
    import fetch_botchan

    try:
        s = fetch_botchan.botchan(tmp_path)
    except RuntimeError as exc:  # no package index reachable
        pytest.skip(str(exc))
    assert "Botchan" in s[:200] and len(s) > 250_000
    assert (tmp_path / "botchan.txt").stat().st_size == 278779  # the file as shipped


def test_equal_effort_table_compares_at_realised_effort():
    from pyeffort.eval import report

    def row(label, realised, kl):
        return {"rule": label, "label": label, "realised": realised, "kl": kl}

    res = [row("(e) x + budget split", 0.2, 1.0), row("(e) x + budget split", 0.4, 0.3)]
    res += [row("(a) o", 0.21, 2.0), row("(a) o", 0.42, 0.2)]
    md = report.equal_effort(res, [0.2, 0.4, 0.9])
    lines = md.strip().splitlines()
    assert lines[2].endswith("| yes |") and lines[3].endswith("| NO |")
    assert "| 0.90 | - | - | - |" in md


def test_pyeffort_eval_subcommand(tmp_path):
    from pyeffort import cli

    src = tmp_path / "t.txt"
    src.write_text("Some text for the tiny model, repeated. " * 20)
    args = ["eval", "--tiny", "--text", str(src), "--rules", "wina", "--efforts", "0.5"]
    args += ["--windows", "1", "--length", "24", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "quality.json").read_text())["results"][0]["rule"] == "wina"


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    from pyeffort.eval import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = [{"rule": "a", "realised": 0.2, "kl": 1.0, "effort": 0.2}]
    assert report.plots(res, tmp_path) == []
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_model_profile_splits_the_effort_and_keeps_the_total(tiny):
    m, ids = tiny
    names = [lin.name for lin in m.linears()]
    # q and up get three times the weight of the others, at every effort
    prof = {"efforts": [0.1, 0.9], "weights": {n: [1.0, 1.0] for n in names}}
    for n in names:
        if n.endswith(("wq", "w3")):
            prof["weights"][n] = [3.0, 3.0]
    m.reset_counters()
    m.forward(ids[:1], 0, 0.3)
    uniform = {lin.name: lin.mults for lin in m.linears()}
    m.set_profile(prof)
    try:
        m.reset_counters()
        for t in range(4):  # decode: one token at a time, as at inference
            m.forward(ids[t : t + 1], t, 0.3)
        assert abs(m.realised_effort() - 0.3) < 0.01
        q = next(lin for lin in m.linears() if lin.name.endswith("wq"))
        assert q.mults / 4 > 1.5 * uniform[q.name]  # q got more than at uniform effort
        h = Harness(m, windows(ids, 1, 16), progress=False)  # hooks bypass the split
        assert abs(h.run("pyeffort", 0.3, allocate=False).realised - 0.3) < 0.01
    finally:
        m.set_profile(None)
    assert all(lin.split is None for lin in m.linears())
    from pyeffort import models

    # the default model's profile names 210 matrices: not applied to a model it does not fit
    assert not models.use_shipped_profile(m, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert m.profile is None


def test_shipped_profile_is_found_for_the_default_model_names():
    from pyeffort.models.default import CACHE_NAME, GGUF_NAME

    gguf = allocation.shipped(GGUF_NAME)
    assert gguf is not None and allocation.shipped(f"/x/{CACHE_NAME}/") == gguf
    prof = allocation.load(gguf)
    assert len(prof["weights"]) == 210 and 0.25 in prof["efforts"]
    assert allocation.shipped("some-other-model.gguf") is None


def test_equal_time_table_reads_the_default_not_a_variant_merged_after_it():
    from pyeffort.eval import report

    def row(rule, label, speedup, kl):
        return {"rule": rule, "label": label, "speedup": speedup, "kl": kl}

    results = [
        row("pyeffort", "(e) pyeffort default + budget split", 1.2, 1.0),
        row("pyeffort", "(e) pyeffort default + budget split", 1.8, 2.0),
        row("pyeffort", "(e') pyeffort default, plain RMS statistic", 1.2, 5.0),
        row("pyeffort", "(e') pyeffort default, plain RMS statistic", 1.8, 6.0),
        row("teal", "(b) TEAL", 1.4, 3.0),
        row("teal", "(b) TEAL", 2.2, 4.0),
    ]
    line = next(
        ln for ln in report.equal_time_table(results).splitlines() if ln.startswith("| 1.5x")
    )
    ours = float(line.split("|")[2])
    assert 1.0 < ours < 2.0, line


def test_q8_rule_is_measured_against_the_exact_fp16_model(tiny):
    """pyeffort_q8 runs the layers' buckets with their values quantised (the reference's q8)
    against the exact fp16 model: at effort 1.0 its KL is the quantisation's alone (small, not
    0), its bytes are 1.625 per multiplication, and its realised effort is the asked one."""
    from pyeffort import _backend, _core

    if "scales" not in __import__("inspect").signature(_core.bucketmul).parameters:
        previous = _backend.use("numpy")  # the compiled core lacks q8 kernels: the reference
    else:
        previous = _backend.current
    try:
        m, ids = tiny
        h = Harness(m, windows(ids, 2, 48), progress=False)
        full, q8 = h.run("pyeffort", 1.0), h.run("pyeffort_q8", 1.0)
        assert full.kl < 1e-4 < q8.kl < 0.01
        assert abs(q8.realised - 1.0) < 1e-12
        assert 0.6 < q8.bytes_per_token / full.bytes_per_token < 0.7  # 1.625 / 2.5 = 0.65
        half = h.run("pyeffort_q8", 0.5)
        assert abs(half.realised - 0.5) < 0.01 and half.kl > q8.kl
        dense = h.run("q8_0", 1.0)  # the dense 8-bit baseline: 1.0625 bytes per weight
        assert 1e-4 < dense.kl < 0.01 and abs(dense.realised - 1.0) < 1e-12
        assert 0.4 < dense.bytes_per_token / full.bytes_per_token < 0.45  # 1.0625 / 2.5
    finally:
        _backend.current = previous
