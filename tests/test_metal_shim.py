"""src/metal's kernels on Linux: compiled as C++17 against the MSL shim and run by the
threadgroup simulator under AddressSanitizer (tests/metal_shim), against reference.py: the same
rows dispatched (in row order), the same cutoff, realised effort and bytes, the same outputs up
to float32 summation order. A kernel that reads or writes out of bounds, or whose threads miss a
barrier, fails."""

import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort import metal, reference

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE / "metal_shim"))
import shim

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and "CXX" not in __import__("os").environ, reason="needs g++"
)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return shim.build(tmp_path_factory.mktemp("metal_shim"))


def check_effort(exe, B, x, e, **kw):
    """Runs the effort kernels on x (n_tok, n_in) and checks them against the reference."""
    y, rows, info = shim.effort(exe, B, x, e, **kw)
    x32 = np.atleast_2d(x).astype(np.float32)
    ref = np.empty((x32.shape[0], B.n_out), dtype=np.float32)
    args = (B.values, B.positions, B.stats, B.order, B.n_out)
    mults, nbytes = reference.bucketmul(x32, *args, e, ref, B.scales)
    m = np.repeat(reference.row_mults(B.n_out), B.n_in)[: B.n_rows]
    for t in range(x32.shape[0]):
        c, disp = reference.cutoff(x32[t], B.stats, B.order, B.n_rows, B.n_out, e)
        np.testing.assert_array_equal(rows[t], np.nonzero(disp)[0])
        assert info[t, 0] == np.float32(c).view(np.uint32), (t, info[t], c)
        assert info[t, 2] == m[disp].sum()
    assert int(info[:, 2].astype(np.int64).sum()) == mults
    srow = None if B.scales is None else metal.scale_rows_of(B.order, B.n_rows)
    assert sum(metal.bytes_read(r, B.n_groups, srow) for r in rows) == nbytes
    scale = float(np.abs(ref).max()) or 1.0
    if y.dtype == np.float16:
        np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=1e-3 * scale)
    else:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6 * scale)
    return rows


def partial(B, fraction):
    """B with the first ``fraction`` of its rows, as a partial load keeps them."""
    n = int(fraction * B.n_rows)
    scales = None if B.scales is None else B.scales[: reference.scale_rows(n, B.n_in)]
    return pyeffort.Buckets(
        B.values[:n], B.positions[:n], B.stats, B.order, B.n_out, scales=scales, verify=False
    )


# n_out: a multiple of 16, a tail of 11, 1 and 6 (3 column tiles), fewer than 16 outputs
CASES = [
    ((64, 48), "f16", [0.0, 0.05, 0.3, 1.0], {"splits": 1, "threads": 64}),
    ((100, 75), "q8", [0.0, 0.05, 0.3, 1.0], {"splits": 3, "threads": 32}),
    ((37, 17), "f16", [0.5], {"splits": 5, "threads": 128}),
    ((33, 5), "q8", [0.6], {"splits": 2, "threads": 64}),
    ((40, 2070), "f16", [0.2], {"splits": 2, "threads": 256}),
    ((40, 2070), "q8", [0.9], {"splits": 1, "threads": 64}),
]


@pytest.mark.parametrize("shape, values, efforts, kw", CASES)
def test_effort_kernels_match_the_reference_on_random_matrices(
    exe, rng, shape, values, efforts, kw
):
    W = (rng.standard_normal(shape) * rng.uniform(0.1, 3, shape[1])).astype(np.float16)
    B = pyeffort.build_buckets(W, values=values)
    x = (rng.standard_normal((3, shape[0])) * rng.uniform(0, 4, shape[0])).astype(np.float32)
    for e in efforts:
        check_effort(exe, B, x, e, **kw)


@pytest.mark.parametrize("values", ["f16", "q8"])
def test_fp16_activations_fp16_outputs_and_partial_loads(exe, rng, values):
    W = rng.standard_normal((90, 130)).astype(np.float16)
    B = partial(pyeffort.build_buckets(W, values=values), 0.45)
    x = rng.standard_normal((2, 90)).astype(np.float16)
    check_effort(exe, B, x, 0.25, splits=2, threads=64)
    check_effort(exe, B, x, 0.7, splits=1, threads=32, y="f16")  # beyond the loaded rows: c = 0


def test_ties_and_zero_activations(exe):
    W = np.tile(np.linspace(-1, 1, 50, dtype=np.float16), (24, 1))  # every input's rows alike
    B = pyeffort.build_buckets(W)
    x = np.stack([np.ones(24), np.zeros(24), np.r_[np.ones(12), -np.ones(12)]])
    rows = check_effort(exe, B, x.astype(np.float32), 0.3, splits=2, threads=32)
    assert len(rows[1]) == B.n_rows  # all s = 0: the cutoff is 0 and every row is done


def test_effort_kernels_on_the_default_model(exe):
    """Layer 3 of SmolLM2-135M (every matrix shape of the model, its output-weighted buckets)
    with the activations it sees decoding real text; q8 values built from the same weights."""
    from pyeffort import models

    try:
        model = models.load()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the default model is not available: {exc}")
    lins = [lin for lin in model.linears() if lin.name.startswith("layers.3.")]
    seen = {}

    def hook(lin, x, effort):
        seen[lin.name] = np.array(x, dtype=np.float32)
        return pyeffort.matmul(np.ascontiguousarray(x, dtype=np.float32), lin.buckets, effort)

    for lin in lins:
        lin.hook = hook
    try:
        model.forward(model.tokenizer.encode("The cat sat on the mat because"), 0)
    finally:
        for lin in lins:
            lin.hook = None
    for k, lin in enumerate(lins):
        x = seen[lin.name][-2:]
        check_effort(exe, lin.buckets, x, [0.1, 0.35, 0.6][k % 3], splits=4, threads=128)
    w2 = lins[-1].buckets.to_dense()
    q8 = pyeffort.build_buckets(w2, values="q8")
    check_effort(exe, q8, seen[lins[-1].name][-1:], 0.25, splits=3, threads=256)


@pytest.mark.parametrize(
    "shape, xt, yt, splits", [((37, 17), "f32", "f32", 1), ((300, 1100), "f16", "f16", 3)]
)
def test_dense_kernel_matches_the_reference(exe, rng, shape, xt, yt, splits):
    W = rng.standard_normal(shape).astype(np.float16)
    x = rng.standard_normal((2, shape[0])).astype(shim.DTYPES[xt])
    y = shim.dense(exe, x, W, splits=splits, y=yt)
    ref = np.empty((2, shape[1]), dtype=np.float32)
    reference.dense_f16(x.astype(np.float32), W, ref)
    tol = 2e-3 if yt == "f16" else 1e-5
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=tol, atol=tol * np.abs(ref).max())


# ---------------------------------------------------------------- the shim catches faults


@pytest.mark.parametrize(
    "name, report",
    [
        ("read_past", "READ of size 4"),
        ("write_past", "WRITE of size 4"),
        ("threadgroup_past", "global-buffer-overflow"),
        ("divergent_barrier", "metal sim: "),
        ("divergent_simd", "metal sim: "),
    ],
)
def test_a_faulty_kernel_fails(exe, name, report):
    with pytest.raises(subprocess.CalledProcessError) as err:
        shim.run(exe, "fault", {}, [name], ["out"])
    assert report in err.value.stderr, err.value.stderr[-2000:]


def test_a_buffer_one_element_short_is_caught(exe, rng):
    """The kernels read stats[r] for every loaded row: one entry fewer is a read past a buffer."""
    B = pyeffort.build_buckets(rng.standard_normal((20, 40)).astype(np.float16))
    arrays = {
        "x": rng.standard_normal(20).astype(np.float32),
        "values": B.values,
        "positions": B.positions,
        "stats": np.ravel(B.stats)[: B.n_rows - 1],
        "order": np.ravel(B.order),
    }
    args = ["f32", "f16", "f32", 20, 40, B.n_rows, 1, 0.5, 1, 32]
    with pytest.raises(subprocess.CalledProcessError) as err:
        shim.run(exe, "effort", arrays, args, ["y"])
    assert "heap-buffer-overflow" in err.value.stderr


# ---------------------------------------------------------------- only Metal's constructs

ATTRIBUTES = re.compile(
    r"buffer\(\d+\)|host_name\(\w+\)|host_name\(\"\w+\"\)|threadgroup_position_in_grid|"
    r"thread_position_in_grid|thread_position_in_threadgroup|thread_index_in_threadgroup|"
    r"threads_per_threadgroup|thread_index_in_simdgroup|simdgroup_index_in_threadgroup"
)
NOT_METAL = re.compile(
    r"\b(static|double|thread_local|new|delete|throw|try|virtual|goto|malloc|printf)\b|std::"
    r"|#include <(?!metal_stdlib>)"
)


def test_the_kernels_use_only_metal_attributes_and_constructs():
    files = sorted((shim.KERNELS).glob("*.metal")) + [shim.KERNELS / "pe_metal.h"]
    assert len(files) >= 5
    for f in files:
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", f.read_text(), flags=re.DOTALL)  # no comments
        text = re.sub(r"#else.*?#endif", "", text, flags=re.DOTALL)  # pe_metal.h's host branch
        for attr in re.findall(r"\[\[(.*?)\]\]", text):
            assert ATTRIBUTES.fullmatch(attr.strip()), (f.name, attr)
        assert NOT_METAL.search(text) is None, (f.name, NOT_METAL.search(text))
        for name, params in re.findall(r"kernel void (\w+)(?:<\w+>)?\(([^{;]*)\)", text):
            for param in params.split(","):  # every kernel parameter is bound by an attribute
                assert re.search(r"\[\[[^\]]+\]\]\s*$", param), (f.name, name, param)
            buffers = re.findall(r"buffer\((\d+)\)", params)
            assert len(buffers) == len(set(buffers)), (f.name, name)
