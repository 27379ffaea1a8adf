"""Build the shim's driver (g++ with AddressSanitizer) and run src/metal's kernels through it on
numpy arrays, as the Metal host would (tests/test_metal_shim.py; by hand: see main())."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from pyeffort import metal

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "src" / "metal"
FLAGS = [
    "-std=c++17",
    "-O1",
    "-g",
    "-fsanitize=address",
    "-fno-omit-frame-pointer",
    "-fsigned-char",  # MSL's char is signed; so is the shim's, on every host
    "-Wall",
    "-Wextra",
    "-Wno-attributes",  # [[buffer(n)]] & co: checked by test_metal_shim's attribute test
    "-pthread",
]
DTYPES = {"f32": np.float32, "f16": np.float16}


def sources() -> list[pathlib.Path]:
    """Everything the driver is built from."""
    files = [*KERNELS.glob("*.metal"), *KERNELS.glob("*.h"), HERE / "include" / "metal_stdlib"]
    return sorted([*files, HERE / "sim.h", HERE / "driver.cpp", HERE / "faults.metal"])


def build(folder) -> pathlib.Path:
    """The driver, built into ``folder`` (reused while its sources are unchanged)."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise FileNotFoundError("g++ is needed to build the Metal shim")
    h = hashlib.sha256(" ".join([cxx, *FLAGS]).encode())
    for f in sources():
        h.update(f.name.encode() + f.read_bytes())
    exe = pathlib.Path(folder) / f"metal_sim_{h.hexdigest()[:16]}"
    if not exe.exists():
        inc = ["-I", str(HERE / "include"), "-I", str(KERNELS), "-I", str(HERE)]
        tmp = exe.with_suffix(".tmp")
        cmd = [cxx, *FLAGS, *inc, str(HERE / "driver.cpp"), "-o", str(tmp)]
        exe.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the Metal shim failed:\n{res.stderr[-6000:]}")
        os.replace(tmp, exe)
    return exe


def run(exe, op: str, arrays: dict, args: list, outputs: list[str]) -> dict:
    """Writes ``arrays`` as DIR/<name>.bin, runs ``exe op DIR *args``, returns the outputs'
    bytes; a failed run (a fault, an ASan report) raises CalledProcessError with its stderr."""
    with tempfile.TemporaryDirectory() as d:
        for name, a in arrays.items():
            pathlib.Path(d, name + ".bin").write_bytes(np.ascontiguousarray(a).tobytes())
        cmd = [str(exe), op, d, *map(str, args)]
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=300)
        return {n: pathlib.Path(d, n + ".bin").read_bytes() for n in outputs}


def effort(exe, B, x, effort_: float, *, splits=1, threads=256, y="f32"):
    """pyeffort.matmul(x, B, effort) through kernel_select -> kernel_bucketmul -> kernel_reduce:
    -> (y (n_tok, n_out), rows (list per token of dispatched rows), info (n_tok, 4) uint32)."""
    x2 = np.atleast_2d(x)
    n_tok, n_rows = x2.shape[0], B.n_rows
    arrays = {
        "x": x2,
        "values": B.values,
        "positions": B.positions,
        "stats": np.ravel(B.stats)[:n_rows],  # exactly the loaded rows: a read past them faults
        "order": np.ravel(B.order)[:n_rows],
    }
    q8 = B.scales is not None
    if q8:
        arrays["scales"] = B.scales
        arrays["srow"] = metal.scale_rows_of(B.order, n_rows)
    xt = "f16" if x2.dtype == np.float16 else "f32"
    args = [xt, "q8" if q8 else "f16", y, B.n_in, B.n_out, n_rows, n_tok, repr(float(effort_))]
    out = run(exe, "effort", arrays, [*args, splits, threads], ["y", "rows", "info"])
    info = np.frombuffer(out["info"], dtype=np.uint32).reshape(n_tok, 4)
    rows = np.frombuffer(out["rows"], dtype=np.uint32).reshape(n_tok, n_rows)
    ys = np.frombuffer(out["y"], dtype=DTYPES[y]).reshape(n_tok, B.n_out)
    return ys, [rows[t, : info[t, 1]] for t in range(n_tok)], info


def dense(exe, x, w16, *, splits=1, y="f32"):
    """pyeffort.dense_matmul(x, w16) through kernel_dense_f16 -> kernel_reduce: (n_tok, n_out)."""
    x2 = np.atleast_2d(x)
    xt = "f16" if x2.dtype == np.float16 else "f32"
    args = [xt, y, w16.shape[0], w16.shape[1], x2.shape[0], splits]
    out = run(exe, "dense", {"x": x2, "w": w16}, args, ["y"])
    return np.frombuffer(out["y"], dtype=DTYPES[y]).reshape(x2.shape[0], w16.shape[1])
