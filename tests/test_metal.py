"""The Metal backend's Python side. Off macOS (CI): a clear error, never a crash, and the one
source the host compiles at first use is well-formed (through the shim). On a Mac with Metal:
the backend against reference.py (skipped elsewhere: this project has no Apple hardware)."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pyeffort
from pyeffort import metal, reference
from pyeffort.errors import BackendError

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE / "metal_shim"))
import shim

REASON = metal.unavailable_reason()
needs_metal = pytest.mark.skipif(REASON is not None, reason=f"no Metal: {REASON}")
off_metal = pytest.mark.skipif(REASON is None, reason="Metal is available here")


@off_metal
def test_without_metal_every_entry_point_says_why(rng):
    B = pyeffort.build_buckets(rng.standard_normal((32, 24)).astype(np.float16))
    for call in (lambda: B.to("metal"), metal.require, lambda: metal.MetalDense(B.to_dense())):
        with pytest.raises(BackendError, match="Metal"):
            call()
    line = pyeffort.runtime_info()["metal"]
    assert line.startswith("unavailable: ") and metal.NOT_RUN in line


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_first_use_source_compiles_as_one_unit(tmp_path):
    """library_source() (every kernel, pe_metal.h inlined) through the shim: no definition
    twice, no include left unresolved."""
    src = tmp_path / "all.metal"
    src.write_text(metal.library_source())
    assert '#include "pe_metal.h"' not in src.read_text()
    inc = ["-I", str(shim.HERE / "include")]  # not src/metal: the header must be inlined
    cmd = ["g++", "-fsyntax-only", "-x", "c++", *shim.FLAGS, *inc, str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


@needs_metal
@pytest.mark.parametrize("values", ["f16", "q8"])
def test_metal_matmul_matches_the_reference(rng, values):
    W = rng.standard_normal((300, 1100)).astype(np.float16)
    B = pyeffort.build_buckets(W, values=values)
    Bm = B.to("metal")
    x = rng.standard_normal((3, 300)).astype(np.float32)
    for e in (0.0, 0.1, 0.5, 1.0):
        y, info = pyeffort.matmul(x, Bm, e, return_info=True)
        ref = np.empty_like(y)
        mults, nbytes = reference.bucketmul(
            x, B.values, B.positions, B.stats, B.order, B.n_out, e, ref, B.scales
        )
        assert (info.mults, info.bytes_read) == (mults, nbytes)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6 * (np.abs(ref).max() or 1))


@needs_metal
def test_metal_group_token_and_dense(rng):
    Ws = [rng.standard_normal((64, n)).astype(np.float16) for n in (64, 40)]
    Bs = [pyeffort.build_buckets(W).to("metal") for W in Ws]
    x = rng.standard_normal(64).astype(np.float32)
    ys = pyeffort.matmul_group(x, Bs, [0.5, 0.3])
    for y, B, e in zip(ys, Bs, [0.5, 0.3]):
        np.testing.assert_array_equal(y, pyeffort.matmul(x, B, e))
    xm, ym = metal.MetalArray.wrap(x), metal.empty(40)
    with metal.token():
        metal.matmul(xm, Bs[1], 0.3, out=ym)
    np.testing.assert_array_equal(ym.numpy(), ys[1])
    yd = metal.dense_matmul(x, metal.MetalDense(Ws[0]))
    np.testing.assert_allclose(yd, x @ Ws[0].astype(np.float32), rtol=1e-4, atol=1e-4)
