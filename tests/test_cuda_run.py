"""bench/cuda_run.py's host side (no GPU): the one JSON's summary from times and bytes, the
speed-up curves, and the equal-time table that joins them with pyeffort eval's KL."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_run", ROOT / "bench" / "cuda_run.py")
cuda_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_run)

NB = 4096 * 14336


def fake_run():
    """Times of a made-up card: 2 TB/s streaming, 4 µs fixed cost on the effort kernels."""
    us, nbytes = {"cublas_f16": 2 * NB / 2e6}, {"cublas_f16": 2 * NB}
    us["dense_q8"], nbytes["dense_q8"] = 1.0625 * NB / 2e6, int(1.0625 * NB)
    for kind, bpm in (("f16", 2.5), ("q8", 1.625)):
        for e in cuda_run.EFFORTS:
            nbytes[f"{kind}_e{e}"] = bpm * e * NB
            us[f"{kind}_e{e}"] = 4.0 + bpm * e * NB / 2e6
    for k in cuda_run.KEEPS:
        nbytes[f"channel_skip_k{k}"] = 2 * k * NB
        us[f"channel_skip_k{k}"] = 3.0 + 2 * k * NB / 2e6
    return us, nbytes


def test_summary_fixed_cost_and_speedups():
    us, nbytes = fake_run()
    groups = {"q8": {"qkv": {"us": 7.0, "bytes": 2e6 * 1.0, "n_mat": 3}}}
    res = cuda_run.summary("Fake GPU", us, nbytes, groups, {"q8": {0.25: 2.5}}, None)
    assert res["card"] == "Fake GPU"
    assert res["bandwidth_gbps"] == pytest.approx(2000)
    for kind in ("q8", "f16"):
        assert res[kind]["fixed_cost_us"] == pytest.approx(4.0)
        want = us["cublas_f16"] / us[f"{kind}_e0.5"]
        assert res[kind]["speedup_e0.5"] == pytest.approx(want)
    assert res["q8"]["fixed_cost_detail_us"]["qkv_per_matrix"] == pytest.approx((7.0 - 1.0) / 3)
    assert res["q8"]["decode_speedup_e0.25"] == 2.5 and res["f16"]["decode_speedup_e0.5"] is None
    assert res["curves"]["teal"][0.5] == pytest.approx(us["cublas_f16"] / us["channel_skip_k0.5"])


def test_equal_time_table_joins_speed_and_kl():
    us, _ = fake_run()
    curves = cuda_run.curves(us)
    quality = []  # KL falling with effort; TEAL's twice pyeffort's at equal effort
    for e in (0.15, 0.2, 0.25, 0.3, 0.4, 0.5):
        quality.append({"rule": "pyeffort", "effort": e, "realised": e, "kl": 0.1 * e})
        quality.append({"rule": "teal", "effort": e, "realised": e, "kl": 0.2 * e})
    md = cuda_run.equal_time(curves, quality, targets=(2.0,))
    row = [ln for ln in md.splitlines() if ln.startswith("| 2x")][0].split("|")
    # cuBLAS NB / 1e6 µs; pyeffort f16 at 2x: 4 + 2.5 e NB / 2e6 = NB / 2e6, e ~ 0.35; TEAL:
    # 3 + 2 k NB / 2e6 = NB / 2e6, k ~ 0.45
    e_ours = (1 - 8e6 / NB) / 2.5
    e_teal = 0.5 - 3e6 / NB
    assert float(row[2]) == pytest.approx(0.1 * e_ours, rel=2e-2)
    assert float(row[3]) == pytest.approx(0.2 * e_teal, rel=2e-2)
    assert row[4].strip() == "teal"


def test_a_failing_stage_keeps_the_others(monkeypatch, tmp_path):
    """measure() on stand-ins of torch and pyeffort.cuda: a stage that raises is named in
    "errors", the later stages still run, and the JSON on disk holds the earlier ones' numbers
    after every stage (a run stopped at its time limit keeps them)."""
    import json
    import sys
    import types

    import pyeffort

    torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_device_name=lambda: "Fake GPU", empty_cache=lambda: None)
    )
    cuda = types.SimpleNamespace(
        _lib=lambda: None, _PDL=True, set_pdl=lambda on: None, _KERNEL="cluster", _TOL=0.02
    )
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "pyeffort.cuda", cuda)
    monkeypatch.setattr(pyeffort, "cuda", cuda, raising=False)
    us, nbytes = fake_run()
    monkeypatch.setattr(cuda_run, "single", lambda t, c: (us, nbytes, {}))

    def groups(t, c, kind, effort):
        if kind == "q8":
            raise RuntimeError("no q8 group here")
        return {"qkv": {"us": 20.0, "bytes": 1e6, "n_mat": 3}}

    monkeypatch.setattr(cuda_run, "time_groups", groups)
    out, seen = tmp_path / "run.json", []

    def save(res):
        cuda_run.write_json(res, out)
        seen.append(json.loads(out.read_text()))

    args = types.SimpleNamespace(no_checks=True, no_decode=True, check_timeout=1)
    res = cuda_run.measure(args, save)
    assert res["errors"] == {"groups_q8": "RuntimeError: no q8 group here"}
    assert (res["kernel"], res["tolerance"]) == ("cluster", 0.02)  # which kernel gave the times
    assert "qkv_per_matrix" in res["f16"]["fixed_cost_detail_us"]
    assert res["q8"]["speedup_e0.25"] == pytest.approx(us["cublas_f16"] / us["q8_e0.25"])
    first_with_times = next(i for i, r in enumerate(seen) if "times_us" in r)
    assert first_with_times < len(seen) - 1  # saved before the group stages ran
    assert json.loads(out.read_text())["card"] == "Fake GPU"
