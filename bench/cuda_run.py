"""One command for the GPU numbers (issue 20): build, check, time in CUDA graphs, one JSON.

    python bench/cuda_run.py --out cuda_run.json          # on the GPU machine (~5 min on an H100)
    python bench/cuda_run.py --table cuda_run.json --quality quality-out/quality.json   # anywhere

Builds the CUDA library (nvcc), runs the CUDA tests (tests/test_cuda_dense.py, tests/test_cuda.py),
then times 4096x14336 with one fp16 token, every kernel inside a CUDA graph that cycles through
enough weight sets (480 MB) that L2 holds none: cuBLAS fp16 (``torch.nn.functional.linear``),
our dense 8-bit GEMV, channel skipping (TEAL-style) and fp16 and q8 buckets at each effort, and
the grouped calls (q/k/v, gate/up) at effort 0.01 for the fixed cost. Fixed cost = the time of a
call at effort 0.01 minus its streaming time (its weight bytes over the best read bandwidth
measured in the run). Writes ``card`` and per value kind (``q8``, ``f16``) ``speedup_e0.5``,
``speedup_e0.25`` (over cuBLAS fp16), ``fixed_cost_us`` and ``decode_speedup_e0.25`` /
``_e0.5`` (from ``bench.test_cuda_decode.decode_speedups`` where it exists, else null with the
reason), plus the raw times, bytes and speed-up curves.

Equal time against channel skipping (issue 20, item 5): ``--table`` joins the curves of a run
with the KL of ``pyeffort eval --rules pyeffort,pyeffort_q8,teal`` (its ``quality.json``; the
KL table itself is that run's ``quality.md``) into pyeffort's and TEAL's KL at equal measured GPU
speed-up (pyeffort/eval/report.py's ``equal_time_table``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (4096, 14336)  # (n_in, n_out)
EFFORTS = (1.0, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.01)  # buckets; eval's efforts among them
KEEPS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)  # channel skipping
# (n_in, outs, ct): q/k/v share one column tile (their default tiles differ: 128 and 64), as
# bench/test_cuda_decode.py builds them
GROUPS = {"qkv": (4096, (4096, 1024, 1024), 64), "gateup": (4096, (14336, 14336), None)}
ROTATE_BYTES = 480e6  # weight bytes cycled per graph: 8x a 60 MB L2
MIN_CALLS = 24  # calls per graph


# ---------------------------------------------------------------- timing


def graph_time_us(call, n_calls: int, rounds: int = 15) -> float:
    """Median µs per call of a CUDA graph of call(0) .. call(n_calls - 1), warmed up outside."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.test_cuda_speed import graph_of  # the suite's capture, warm-up included

    g = graph_of(call, n_calls)
    times = []
    for r in range(rounds + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if r >= 2:
            times.append(a.elapsed_time(b) * 1e3 / n_calls)
    return sorted(times)[len(times) // 2]


def n_sets(bytes_per_set: float) -> int:
    return max(2, math.ceil(ROTATE_BYTES / bytes_per_set))


# ---------------------------------------------------------------- the single matrix


def single_sets(torch, cuda, pyeffort):
    """Weight sets of 4096x14336, N(0, 0.02): (W (n_in, n_out) f16, W^T for cuBLAS, x, f16
    buckets, q8 buckets, dense q8)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(n_sets(2 * SHAPE[0] * SHAPE[1])):
        w = (torch.randn(SHAPE, generator=gen, device="cuda") * 0.02).half()
        x = torch.randn(SHAPE[0], generator=gen, device="cuda").half()
        wq = cuda.to_device(pyeffort.quantize_dense_q8(w.cpu().numpy()))
        b16, b8 = cuda.build_buckets(w), cuda.build_buckets(w, values="q8")
        sets.append((w, w.t().contiguous(), x, b16, b8, wq))
    return sets


def time_single(torch, cuda, pyeffort, sets) -> tuple[dict, dict]:
    """-> (µs per call, weight bytes per call) of every kind on the single matrix."""
    import torch.nn.functional as F

    y = torch.empty(SHAPE[1], dtype=torch.float16, device="cuda")
    n = max(len(sets), MIN_CALLS)
    at = lambda i: sets[i % len(sets)]  # noqa: E731
    us, nbytes = {}, {}
    us["cublas_f16"] = graph_time_us(lambda i: F.linear(at(i)[2].view(1, -1), at(i)[1]), n)
    nbytes["cublas_f16"] = 2 * SHAPE[0] * SHAPE[1]
    us["dense_q8"] = graph_time_us(lambda i: cuda.dense_q8_matmul(at(i)[2], at(i)[5], out=y), n)
    nbytes["dense_q8"] = sets[0][5].nbytes
    for keep in KEEPS:
        name = f"channel_skip_k{keep}"
        us[name] = graph_time_us(
            lambda i, k=keep: cuda.channel_skip_matmul(at(i)[2], at(i)[0], k, out=y), n
        )
        nbytes[name] = 2 * cuda.keep_count(keep, SHAPE[0]) * SHAPE[1]
    for kind, slot in (("f16", 3), ("q8", 4)):
        for e in EFFORTS:
            name = f"{kind}_e{e}"
            _, info = pyeffort.matmul(sets[0][2], sets[0][slot], e, out=y, return_info=True)
            us[name] = graph_time_us(
                lambda i, e=e, s=slot: pyeffort.matmul(at(i)[2], at(i)[s], e, out=y), n
            )
            nbytes[name] = info.bytes_read
    return us, nbytes


# ---------------------------------------------------------------- grouped calls


def time_groups(torch, cuda, kind: str, effort: float) -> dict:
    """Per group: µs per call at ``effort`` and the weight bytes it read."""
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, (n_in, outs, ct) in GROUPS.items():
        per_set = 2 * n_in * sum(outs)
        groups, xs = [], []
        for _ in range(n_sets(per_set)):
            ws = [(torch.randn((n_in, o), generator=gen, device="cuda") * 0.02).half() for o in outs]
            mats = [cuda.build_buckets(w, values=kind, ct=ct) for w in ws]
            groups.append(cuda.CudaGroup(mats))
            xs.append(torch.randn(n_in, generator=gen, device="cuda").half())
        ys = [torch.empty(o, dtype=torch.float16, device="cuda") for o in outs]
        _, infos = cuda.matmul_group(xs[0], groups[0], effort, outs=ys, return_info=True)
        n = max(len(groups), MIN_CALLS)
        t = graph_time_us(
            lambda i: cuda.matmul_group(xs[i % len(xs)], groups[i % len(groups)], effort, outs=ys),
            n,
        )
        out[name] = {"us": t, "bytes": sum(i.bytes_read for i in infos), "n_mat": len(outs)}
        del groups, xs
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- summary


def bandwidth_gbps(us: dict, nbytes: dict) -> float:
    """The best weight-read bandwidth of the run (dense kernels and effort 1.0)."""
    names = ["cublas_f16", "dense_q8", "f16_e1.0", "q8_e1.0"]
    return max(nbytes[k] / us[k] / 1e3 for k in names if k in us)


def fixed_cost_us(t_us: float, n_bytes: float, gbps: float) -> float:
    """A call's time minus its streaming time at ``gbps``."""
    return t_us - n_bytes / gbps / 1e3


def curves(us: dict) -> dict:
    """Speed-up over cuBLAS fp16 against effort: {rule: {effort: speed-up}} (eval's rule names)."""
    base = us["cublas_f16"]
    pick = lambda prefix: {  # noqa: E731
        float(k[len(prefix) :]): base / v for k, v in us.items() if k.startswith(prefix)
    }
    return {"pyeffort": pick("f16_e"), "pyeffort_q8": pick("q8_e"), "teal": pick("channel_skip_k")}


def decode_speedups() -> tuple[dict, str | None]:
    """{kind: {effort: speed-up}} from bench/test_cuda_decode.py, or ({}, why not)."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.test_cuda_decode import decode_speedups as fn
    except ImportError as e:
        return {}, f"bench/test_cuda_decode.py has no decode_speedups ({e})"
    out = {}
    for kind in ("q8", "f16"):
        try:
            res = fn(kind, (0.25, 0.5))
            out[kind] = {float(k): float(v) for k, v in dict(res).items()}
        except Exception as e:  # a failing peer must not cost the kernel numbers
            return out, f"decode_speedups({kind!r}) failed: {type(e).__name__}: {e}"
    return out, None


def summary(card, us, nbytes, groups, decode, decode_note) -> dict:
    gbps = bandwidth_gbps(us, nbytes)
    res = {"card": card, "shape": list(SHAPE), "bandwidth_gbps": gbps}
    for kind in ("q8", "f16"):
        e01 = f"{kind}_e0.01"
        fixed = {"alone": fixed_cost_us(us[e01], nbytes[e01], gbps)}
        for name, g in groups.get(kind, {}).items():
            fixed[f"{name}_per_matrix"] = fixed_cost_us(g["us"], g["bytes"], gbps) / g["n_mat"]
        d = decode.get(kind, {})
        res[kind] = {
            "speedup_e0.5": us["cublas_f16"] / us[f"{kind}_e0.5"],
            "speedup_e0.25": us["cublas_f16"] / us[f"{kind}_e0.25"],
            "fixed_cost_us": fixed["alone"],
            "fixed_cost_detail_us": fixed,
            "decode_speedup_e0.25": d.get(0.25),
            "decode_speedup_e0.5": d.get(0.5),
        }
    res["decode_note"] = decode_note
    res["times_us"], res["bytes"], res["groups_e0.01"] = us, nbytes, groups
    res["curves"] = curves(us)
    return res


# ---------------------------------------------------------------- equal time (item 5)


def equal_time(curves_: dict, quality: list[dict], targets=(1.5, 2.0, 3.0)) -> str:
    """KL of pyeffort's rules and of TEAL at equal GPU speed-up: each quality result of a rule
    with a curve gets the speed-up interpolated at its realised effort (linear between the
    measured efforts; none outside them), then report.equal_time_table per value kind."""
    from pyeffort.eval import report

    def at(curve: dict, e: float):
        pts = sorted(curve.items())
        for (e0, s0), (e1, s1) in zip(pts, pts[1:]):
            if e0 <= e <= e1:
                return s0 + (s1 - s0) * (e - e0) / (e1 - e0) if e1 > e0 else s0
        return None

    md = []
    for ours in ("pyeffort", "pyeffort_q8"):
        rows = []
        for r in quality:
            rule = r["rule"]
            if rule not in (ours, "teal") or rule not in curves_:
                continue
            e = r.get("realised", r.get("effort"))
            s = at(curves_[rule], float(e)) if e is not None else None
            rows.append({**r, "rule": "pyeffort" if rule == ours else rule, "speedup": s})
        md.append(f"### {ours} against TEAL (GPU speed-up over cuBLAS fp16)\n")
        md.append(report.equal_time_table(rows, targets))
    return "\n".join(md)


# ---------------------------------------------------------------- the command


def run_checks(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    cmd += ["tests/test_cuda_dense.py", "tests/test_cuda.py"]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = (res.stdout + res.stderr)[-3000:]
        return {"returncode": res.returncode, "tail": tail}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "tail": f"timed out after {timeout} s"}


def measure(args, save) -> dict:
    """Every stage in turn; ``save(res)`` after each, so that a stage that fails (its error in
    ``res["errors"]``) or a run stopped at its time limit keeps what was measured before it."""
    import torch

    from pyeffort import cuda

    res = {"card": torch.cuda.get_device_name(), "commit": _git("rev-parse", "HEAD"), "errors": {}}
    res["kernel"], res["tolerance"] = cuda._KERNEL, cuda._TOL  # PYEFFORT_CUDA_KERNEL, set_tolerance
    t0 = time.time()
    cuda._lib()
    res["build_s"] = time.time() - t0
    print(f"library built/loaded in {res['build_s']:.0f} s", flush=True)
    res["checks"] = {"skipped": True} if args.no_checks else run_checks(args.check_timeout)
    print("checks:", res["checks"].get("tail", "skipped")[-400:], flush=True)
    save(res)
    us, nbytes, groups = _stage(res, "single", save, lambda: single(torch, cuda)) or ({}, {}, {})
    if us:  # the raw times at once: a later stage may not end
        res["times_us"], res["bytes"] = us, nbytes
    for kind in ("f16", "q8"):
        groups[kind] = _stage(res, f"groups_{kind}", save,
                              lambda k=kind: time_groups(torch, cuda, k, 0.01))  # fmt: skip
    pdl = cuda._PDL
    cuda.set_pdl(not pdl)  # the other launch mode, for the fixed cost (set_pdl's default: on)
    try:
        alt = _stage(res, "groups_other_pdl", save, lambda: time_groups(torch, cuda, "f16", 0.01))
    finally:
        cuda.set_pdl(pdl)
    decode, note = ({}, "--no-decode") if args.no_decode else decode_speedups()
    if us:
        res |= summary(res["card"], us, nbytes, {k: g for k, g in groups.items() if g}, decode,
                       note)  # fmt: skip
    res["groups_e0.01_pdl_" + ("off" if pdl else "on")] = {"f16": alt}
    save(res)
    return res


def single(torch, cuda):
    import pyeffort

    sets = single_sets(torch, cuda, pyeffort)
    us, nbytes = time_single(torch, cuda, pyeffort, sets)
    del sets
    torch.cuda.empty_cache()
    return us, nbytes, {}


def _stage(res: dict, name: str, save, fn):
    """fn() -> its result, or None with the error kept in res["errors"][name]; then save(res)."""
    print(f"== {name}", flush=True)
    try:
        out = fn()
        res.setdefault("stages", {})[name] = out if name != "single" else "done"
        return out
    except Exception as e:  # noqa: BLE001 (one failing stage must not cost the others)
        res["errors"][name] = f"{type(e).__name__}: {e}"
        print(f"{name} failed: {res['errors'][name]}", flush=True)
        return None
    finally:
        save(res)


def _git(*a) -> str | None:
    try:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def write_json(res: dict, out) -> None:
    """res -> out, atomically (a run stopped at its limit leaves the last whole file)."""
    tmp = pathlib.Path(out).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out)


def print_report(res: dict) -> None:
    print(f"\n{res['card']}, {res['shape'][0]}x{res['shape'][1]}, one fp16 token, CUDA graphs")
    print(f"best read bandwidth {res['bandwidth_gbps']:.0f} GB/s\n")
    print("| kernel | µs | GB/s | speed-up over cuBLAS |\n|---|---:|---:|---:|")
    base = res["times_us"]["cublas_f16"]
    for k, t in res["times_us"].items():
        print(f"| {k} | {t:.1f} | {res['bytes'][k] / t / 1e3:.0f} | {base / t:.2f}x |")
    for kind in ("q8", "f16"):
        print(f"\n{kind}: " + json.dumps({k: v for k, v in res[kind].items()}, indent=None))
    if res.get("decode_note"):
        print("decode:", res["decode_note"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="cuda_run.json", help="the JSON written (a GPU run)")
    p.add_argument("--no-checks", action="store_true", help="skip the CUDA tests")
    p.add_argument("--no-decode", action="store_true", help="skip the decode speed-ups")
    p.add_argument("--check-timeout", type=int, default=300)
    p.add_argument("--table", help="a JSON of an earlier run: print the equal-time table only")
    p.add_argument("--quality", help="quality.json of pyeffort eval (with --table)")
    args = p.parse_args(argv)
    if args.table:
        if not args.quality:
            print("the KL per effort: pyeffort eval --rules pyeffort,pyeffort_q8,teal --out DIR")
            print("(DIR/quality.md; then --quality DIR/quality.json here)")
            return 2
        res = json.loads(pathlib.Path(args.table).read_text())
        quality = json.loads(pathlib.Path(args.quality).read_text())["results"]
        print(equal_time(res["curves"], quality))
        return 0
    res = measure(args, lambda r: write_json(r, args.out))
    if "times_us" in res:
        print_report(res)
    print(f"\nwrote {args.out}; the KL for the equal-time table: pyeffort eval --rules "
          "pyeffort,pyeffort_q8,teal (its quality.md), then --table with --quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
