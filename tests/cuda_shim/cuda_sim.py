"""Build the CUDA shim's driver (g++ with AddressSanitizer) and run src/cuda's C API through it
on numpy arrays, preparing the device buffers as pyeffort/cuda.py does
(tests/test_cuda_shim.py)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from pyeffort import reference

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "src" / "cuda"
UNITS = ["bucketmul.cu", "cluster.cu", "dense_q8.cu", "channel_skip.cu", "status.cu"]  # as cuda.SOURCES
FLAGS = [
    "-std=c++17",
    "-O0",
    "-g1",
    "-fsanitize=address,alignment",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-fno-strict-aliasing",  # CUDA code reads memory through casts of other types
    "-ffp-contract=off",  # float arithmetic as written: fused only where the kernel asks
    "-fno-extern-tls-init",  # __shared__ is thread_local, never dynamically initialised (and
    # g++ 12 calls a null init function for `extern __shared__` inside a template without it)
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-pthread",
]
DTYPES = {"f32": 0, "f16": 1, "bf16": 2}  # pe_cuda.h's codes
SMS = 132  # multiprocessors of the simulated device (include/cuda_runtime.h)
# every run's environment (CUDA_SIM_ORDER, CUDA_SIM_TIMEOUT: sim.h)
ENV = {
    "ASAN_OPTIONS": "detect_leaks=0",
    "UBSAN_OPTIONS": "print_stacktrace=1",
    "CUDA_SIM_TIMEOUT": "60",  # a grid here takes well under a second
}


def sources() -> list[pathlib.Path]:
    """Everything the driver is built from."""
    files = [*KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh"), *KERNELS.glob("*.h")]
    files += [*HERE.glob("include/*.h"), HERE / "sim.h", HERE / "driver.cpp", HERE / "faults.cu"]
    return sorted(files)


def build(folder) -> pathlib.Path:
    """The driver, built into ``folder`` (reused while its sources are unchanged): each CUDA
    source a translation unit of its own, as nvcc builds the library."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise FileNotFoundError("g++ is needed to build the CUDA shim")
    h = hashlib.sha256(" ".join([cxx, *FLAGS]).encode())
    for f in sources():
        h.update(f.name.encode() + f.read_bytes())
    exe = pathlib.Path(folder) / f"cuda_sim_{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    inc = ["-I", str(HERE / "include"), "-I", str(KERNELS), "-I", str(HERE)]
    units = [KERNELS / u for u in UNITS] + [HERE / "driver.cpp"]
    objs = [exe.parent / f"{exe.name}_{u.stem}.o" for u in units]

    def compile_(src, obj):
        cmd = [cxx, *FLAGS, *inc, "-c", "-x", "c++", str(src), "-o", str(obj)]
        return subprocess.run(cmd, check=False, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_, units, objs))
    errors = "".join(r.stderr for r in results if r.returncode)
    if errors:
        raise RuntimeError(f"building the CUDA shim failed:\n{errors[-6000:]}")
    tmp = exe.with_suffix(".tmp")
    res = subprocess.run(
        [cxx, *FLAGS, *map(str, objs), "-o", str(tmp)], check=False, capture_output=True, text=True
    )
    if res.returncode:
        raise RuntimeError(f"linking the CUDA shim failed:\n{res.stderr[-6000:]}")
    os.replace(tmp, exe)
    return exe


class RunError(subprocess.CalledProcessError):
    """A failed run of the driver; its message ends with the driver's stderr (the fault)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr[-4000:]}"


class Script:
    """Lines of the driver's script (driver.cpp) with the arrays they load."""

    def __init__(self):
        self.lines: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.saved: list[str] = []

    def load(self, name: str, a) -> str:
        self.arrays[name] = np.ascontiguousarray(a)
        self.lines.append(f"load {name}")
        return name

    def buf(self, name: str, nbytes: int, fill: int = 0) -> str:
        self.lines.append(f"buf {name} {int(nbytes)} {fill}")
        return name

    def save(self, name: str, file: str | None = None) -> str:
        file = file or name
        self.lines.append(f"save {name} {file}")
        self.saved.append(file)
        return file

    def add(self, *words) -> None:
        self.lines.append(" ".join(map(str, words)))

    def run(self, exe, env=None, timeout=600) -> tuple[list[int], dict[str, bytes]]:
        """-> (the statuses of the API calls, the saved buffers); a failed run (a fault, an ASan
        report) raises RunError."""
        with tempfile.TemporaryDirectory() as d:
            for name, a in self.arrays.items():
                pathlib.Path(d, name + ".bin").write_bytes(a.tobytes())
            script = pathlib.Path(d, "script")
            script.write_text("\n".join(self.lines) + "\n")
            res = subprocess.run(
                [str(exe), d, str(script)],
                check=False,
                capture_output=True,
                text=True,
                env={**os.environ, **ENV, **(env or {})},
                timeout=timeout,
            )
            if res.returncode:
                raise RunError(res.returncode, res.args, res.stdout, res.stderr)
            statuses = [
                int(s.split()[1]) for s in res.stdout.splitlines() if s.startswith("status")
            ]
            return statuses, {n: pathlib.Path(d, n + ".bin").read_bytes() for n in self.saved}


# ---------------------------------------------------------------- the effort matmul


@dataclasses.dataclass
class Matrix:
    """A Buckets on the simulated device, as cuda.CudaBuckets holds it, in a group."""

    B: object
    name: str
    ct: int
    n_tiles: int
    total_w: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def upload(s: Script, B, name: str, ct=None) -> Matrix:
    """B's device buffers (CudaBuckets._setup: the repack by cuda.repack / repack_q8 on CPU
    tensors, order, stats, histograms, state) -> a Matrix."""
    import torch

    from pyeffort import cuda

    t = lambda a: torch.as_tensor(np.require(a, requirements="W"))
    g = reference.n_groups(B.n_out)
    ct = ct or cuda._coop_ct(g, SMS)  # CudaBuckets' default tile width (the coop kernel's)
    values, positions, stats, order = t(B.values), t(B.positions), t(B.stats), t(B.order)
    if B.scales is None:
        wt = cuda.repack(torch, values, positions, ct)
    else:
        wt, slot = cuda.repack_q8(torch, values, positions, t(B.scales), stats, order, ct)
        s.load(f"{name}_slot", slot.numpy())
    s.load(f"{name}_wt", wt.numpy())
    s.load(f"{name}_order", np.ravel(B.order)[: B.n_rows].astype(np.int32))
    s.load(f"{name}_stats", np.ravel(B.stats)[: B.n_rows].astype(np.float32))
    s.buf(f"{name}_hist", 4 * 2 * 4096)  # level-1 histograms, by call parity
    s.buf(f"{name}_state", 64)  # pe_cuda_state
    total_w = int(np.repeat(reference.row_mults(B.n_out), B.n_in)[: B.n_rows].sum())
    return Matrix(B, name, ct, _ceil_div(g, ct), total_w)


def group(s: Script, mats: list[Matrix], splits: int, name="g", kernel="coop") -> int:
    """The group's scratch and matrix lines (cuda.CudaGroup) -> its number of worker blocks.
    kernel "cluster": splits is the cluster size C (cuda.CudaGroup._cluster_layout: no
    scratch, every matrix C splits, its blocks tile-major)."""
    if kernel == "cluster":
        return _cluster_group(s, mats, splits)
    tiles = sum(m.n_tiles for m in mats)
    assert tiles + len(mats) <= SMS and 1 <= splits <= (SMS - len(mats)) // tiles
    block0 = 0
    for i, m in enumerate(mats):
        B = m.B
        sp = min(splits, _ceil_div(B.n_rows, 32))
        n_part = sp * m.n_tiles * 16 * m.ct if sp > 1 else 1
        split_rows = 32 * _ceil_div(_ceil_div(B.n_rows, 32), sp)
        seg = _ceil_div(split_rows, m.n_tiles)
        part = s.buf(f"{name}{i}_partial", 8 * n_part)
        cand = s.buf(f"{name}{i}_cand", 4 * m.n_tiles * sp * (2 * seg + 4))
        slot = f"{m.name}_slot" if B.scales is not None else "-"
        n = m.name
        s.add(
            "mat", i, f"{n}_wt", f"{n}_order", f"{n}_stats", f"{n}_hist", cand, part, slot,
            f"{n}_state", B.n_in, B.n_out, B.n_rows, m.ct, m.n_tiles, sp, block0, seg,
            int(B.scales is not None), m.total_w,
        )  # fmt: skip
        block0 += m.n_tiles * sp
    return block0


def _cluster_group(s: Script, mats: list[Matrix], C: int) -> int:
    assert C in (1, 2, 4, 8, 16)
    block0 = 0
    for i, m in enumerate(mats):
        B, n = m.B, m.name
        slot = f"{n}_slot" if B.scales is not None else "-"
        s.add(
            "mat", i, f"{n}_wt", f"{n}_order", f"{n}_stats", "-", "-", "-", slot, f"{n}_state",
            B.n_in, B.n_out, B.n_rows, m.ct, m.n_tiles, C, block0, 0,
            int(B.scales is not None), m.total_w,
        )  # fmt: skip
        block0 += m.n_tiles * C
    return block0


@dataclasses.dataclass
class Call:
    """One pe_cuda_matmul of a group: x (n_tokens, n_in) (float32, float16, or uint16 bits of
    bfloat16 with xd="bf16") at effort (by a device pointer with by_ptr), or at a list of
    efforts, one per matrix (from device memory: effort_each)."""

    x: np.ndarray
    effort: float | list[float]
    y: str = "f32"
    xd: str | None = None
    by_ptr: bool = False
    tol: float = 0.0  # the cluster kernel's tolerance (pe_cuda_matmul_cluster)

    def effort_of(self, i: int) -> float:
        """Matrix i's effort."""
        return self.effort[i] if isinstance(self.effort, list) else self.effort


@dataclasses.dataclass
class Result:
    y: list[np.ndarray]  # per matrix (n_tokens, n_out), float32
    state: list[np.ndarray]  # per matrix pe_cuda_state as (8,) uint64 after the call


def effort_calls(exe, Bs: list, phases: list, ct=None, kernel="coop") -> list[list[Result]]:
    """One driver run: the matrices Bs uploaded, then per phase (indices into Bs, splits,
    calls) their group (cuda.CudaGroup: scratch of its own; the matrices' state carries over
    between calls and phases, as on the device) and its calls in order, each with NaN-poisoned
    outputs and the info sums zeroed first (cuda._run), by `kernel` ("coop" or "cluster": then
    splits is the cluster size). -> per phase, per call, a Result."""
    s = Script()
    mats = [upload(s, B, f"m{i}", ct) for i, B in enumerate(Bs)]
    s.add("init")
    runs = []
    for p, (idx, splits, calls) in enumerate(phases):
        ms = [mats[i] for i in idx]
        n_workers = group(s, ms, splits, name=f"g{p}_", kernel=kernel)
        runs.append([(f"p{p}c{c}", ms, n_workers, call, kernel) for c, call in enumerate(calls)])
        for r in runs[-1]:
            _add_call(s, *r)
    statuses, out = s.run(exe)
    assert statuses == [0] * (1 + sum(len(r) for r in runs)), statuses
    return [[_read_call(out, *r) for r in run] for run in runs]


def _as_f32(b: bytes, dtype: str) -> np.ndarray:
    """Output bytes of a dtype code name -> float32."""
    if dtype == "bf16":
        return (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(b, {"f32": np.float32, "f16": np.float16}[dtype]).astype(np.float32)


def _add_call(
    s: Script, tag: str, mats: list[Matrix], n_workers: int, call: Call, kernel="coop"
) -> None:
    x = np.atleast_2d(call.x)
    xd = call.xd or {np.float32: "f32", np.float16: "f16"}[x.dtype.type]
    ys = []
    for i, m in enumerate(mats):
        ys.append(s.buf(f"{tag}_y{i}", (4 if call.y == "f32" else 2) * x.shape[0] * m.B.n_out, 255))
        s.add("set", f"{m.name}_state", 40, 24, 0)  # info_mults, info_rows, info_records
    s.add("group", len(mats), n_workers, *ys)
    xb = s.load(f"{tag}_x", x)
    each = isinstance(call.effort, list)
    assert not each or len(call.effort) == len(mats)
    by_ptr = call.by_ptr or each
    eb = s.load(f"{tag}_e", np.array(call.effort, np.float64).reshape(-1)) if by_ptr else "-"
    ev = 0.0 if by_ptr else repr(float(call.effort))
    args = (xb, DTYPES[xd], x.shape[0], eb, ev, int(each), DTYPES[call.y], 1)
    s.add("matmul_cluster", *args, repr(call.tol)) if kernel == "cluster" else s.add("matmul", *args, 1)
    for i, m in enumerate(mats):
        s.save(ys[i])
        s.save(f"{m.name}_state", f"{tag}_st{i}")


def _read_call(out: dict, tag: str, mats: list[Matrix], n_workers: int, call: Call, kernel="coop") -> Result:
    n_tok = np.atleast_2d(call.x).shape[0]
    ys = [_as_f32(out[f"{tag}_y{i}"], call.y).reshape(n_tok, m.B.n_out) for i, m in enumerate(mats)]
    return Result(ys, [np.frombuffer(out[f"{tag}_st{i}"], np.uint64) for i in range(len(mats))])


# ---------------------------------------------------------------- the dense baselines

DENSE_COLS = 256  # columns per block of both dense kernels (cuda.DENSE_COLS)


def _xd(x: np.ndarray) -> str:
    return {np.float32: "f32", np.float16: "f16"}[x.dtype.type]


def _dense_scratch(s: Script, splits: int, n_out: int) -> tuple[str, str]:
    """(partial, count) of splitk.cuh (cuda._splitk_scratch): count zeroed."""
    return s.buf("partial", 4 * splits * n_out, 255), s.buf(
        "count", 4 * _ceil_div(n_out, DENSE_COLS)
    )


def _dense_outputs(s: Script, exe, calls: int, shape, y: str) -> list[np.ndarray]:
    """Runs s; -> each call's y as float32, after checking every tile's count is back to 0."""
    s.save("count")
    statuses, out = s.run(exe)
    assert statuses == [0] * calls, statuses
    assert not np.frombuffer(out["count"], np.uint32).any(), "a tile's count was left non-zero"
    ydt = {"f32": np.float32, "f16": np.float16}[y]
    return [
        np.frombuffer(out[f"y{c}"], ydt).reshape(shape).astype(np.float32) for c in range(calls)
    ]


def dense_q8(exe, x, wq, *, splits=1, y="f32", calls=2) -> list[np.ndarray]:
    """pe_cuda_dense_q8 (cuda.dense_q8_matmul) of x (n_tokens, n_in) and a DenseQ8, `calls`
    times on the same scratch -> each call's (n_tokens, n_out)."""
    x = np.atleast_2d(x)
    n_in, n_out = wq.shape
    s = Script()
    s.load("x", x), s.load("q", wq.q), s.load("sc", wq.scales.view(np.uint16))
    partial, count = _dense_scratch(s, splits, n_out)
    for c in range(calls):
        s.buf(f"y{c}", (4 if y == "f32" else 2) * x.shape[0] * n_out, 255)
        s.add("dense_q8", "x", DTYPES[_xd(x)], x.shape[0], "q", "sc", n_in, n_out, splits,
              partial, count, f"y{c}", DTYPES[y])  # fmt: skip
        s.save(f"y{c}")
    return _dense_outputs(s, exe, calls, (x.shape[0], n_out), y)


def channel_skip(exe, x, w16, k: int, *, splits=1, y="f32", calls=2) -> list[np.ndarray]:
    """pe_cuda_channel_skip (cuda.channel_skip_matmul) of x (n_tokens, n_in), keeping k rows of
    w16 (n_in, n_out) fp16, `calls` times on the same scratch -> each call's (n_tokens, n_out)."""
    x = np.atleast_2d(x)
    n_in, n_out = w16.shape
    s = Script()
    s.load("x", x), s.load("w", w16.view(np.uint16))
    s.buf("rows", 4 * max(k, 1)), s.buf("xs", 4 * max(k, 1))
    partial, count = _dense_scratch(s, splits, n_out)
    for c in range(calls):
        s.buf(f"y{c}", (4 if y == "f32" else 2) * x.shape[0] * n_out, 255)
        s.add("channel_skip", "x", DTYPES[_xd(x)], x.shape[0], k, "w", n_in, n_out, splits,
              "rows", "xs", partial, count, f"y{c}", DTYPES[y])  # fmt: skip
        s.save(f"y{c}")
    return _dense_outputs(s, exe, calls, (x.shape[0], n_out), y)


def fault(exe, name: str, timeout_s: float = 3.0) -> RunError:
    """faults.cu's kernel `name` -> the error of the driver's failed run (it must fail)."""
    s = Script()
    s.add("fault", name)
    try:
        s.run(exe, env={"CUDA_SIM_TIMEOUT": str(timeout_s)}, timeout=120)
    except RunError as err:
        return err
    raise AssertionError(f"the fault kernel {name} ran without a fault")
