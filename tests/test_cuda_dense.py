"""The GPU's dense baselines (src/cuda/dense_q8.cu, channel_skip.cu) against numpy references
at odd shapes: the dense 8-bit GEMV against pyeffort.dense's reference, channel skipping against
the k rows of largest |x| (ties: lower index). GPU tests are marked ``cuda`` and skip without
one; the host logic (row count, split choice, refusals) runs everywhere torch does."""

import numpy as np
import pytest

import pyeffort
from pyeffort import dense
from pyeffort.errors import DTypeError, EffortError

torch = pytest.importorskip("torch")
from pyeffort import cuda  # imports torch lazily; needs no GPU



def gpu(test):
    """A test that runs the kernels: marked cuda, skipped without a GPU."""
    needs = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
    return pytest.mark.cuda(needs(test))

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
SHAPES = [(100, 37), (257, 300), (4096, 1024), (33, 8), (1000, 7), (64, 4100)]


def kept_rows(x32: np.ndarray, k: int) -> np.ndarray:
    """The spec of channel skipping: the k rows of largest |x| in float32, ties by lower index."""
    order = np.lexsort((np.arange(x32.size), -np.abs(x32)))
    return np.sort(order[:k])


def check(y, ref64, scale64, rel=2e-5):
    y = y.float().cpu().numpy().astype(np.float64).reshape(ref64.shape)
    assert np.isfinite(y).all(), "an output was not written"
    err = np.abs(y - ref64)
    assert (err <= rel * scale64 + 1e-7 * scale64.max() + 1e-30).all(), float(err.max())


def test_keep_count_is_the_teal_rules():
    assert [cuda.keep_count(f, 4096) for f in (0.0, 0.25, 0.5, 1.0)] == [0, 1024, 2048, 4096]
    assert cuda.keep_count(0.5, 7) == round(3.5) == 4  # Python's round, as rules._channel_rule
    with pytest.raises(EffortError):
        cuda.keep_count(1.5, 10)


def test_splits_fill_one_wave_and_keep_work_per_split():
    # 4096x14336 on 132 multiprocessors: 56 tiles, 3 blocks each -> 7 splits of 128 blocks
    assert cuda.dense_splits(14336, 128, 8, 132, "q8") == 7
    assert cuda.dense_splits(4096, 448, 8, 132, "q8") == 24  # 16 tiles: 396 // 16
    assert cuda.dense_splits(4096, 40, 8, 132, "q8") == 5  # at least 8 blocks per split
    assert cuda.dense_splits(14336, 10, 64, 132, "rows") == 1
    assert cuda.dense_splits(10**6, 10**6, 8, 132, "q8") == 1  # more tiles than a wave


def test_host_refuses_cpu_tensors():
    wq = pyeffort.quantize_dense_q8(np.ones((64, 8), np.float16))
    with pytest.raises(DTypeError):
        cuda.channel_skip_matmul(torch.ones(64), torch.ones((64, 8), dtype=torch.float16), 0.5)
    with pytest.raises(DTypeError):
        cuda.dense_q8_matmul(torch.ones(64), wq)  # a host DenseQ8, not a CudaDenseQ8


@pytest.mark.parametrize("x_rows", [5, 64])
def test_kept_rows_spec(x_rows):
    x = np.array([1.0, -3.0, 3.0, 0.5, -1.0] + [0.0] * (x_rows - 5), np.float32)
    assert list(kept_rows(x, 3)) == [0, 1, 2]  # |1| ties with |-1|: the lower index
    assert list(kept_rows(x, 2)) == [1, 2]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("out", ["f32", "x"])
def test_dense_q8_matches_reference(shape, dtype, out, rng):
    w = (rng.standard_normal(shape) * rng.gamma(1.0, size=(shape[0], 1)) * 0.05).astype(np.float16)
    wq = pyeffort.quantize_dense_q8(w)
    wc = cuda.to_device(wq, "cuda")
    w_abs = np.abs(wq.dequantize().astype(np.float64))
    for n_tok in (1, 3):
        x = torch.from_numpy(rng.standard_normal((n_tok, shape[0])).astype(np.float32))
        x = x.to("cuda", DTYPES[dtype])
        x = x[0] if n_tok == 1 else x
        od = torch.float32 if out == "f32" else x.dtype
        y = torch.full(x.shape[:-1] + (shape[1],), float("nan"), dtype=od, device="cuda")
        for _ in range(2):  # twice: the split counters are back at 0 after a call
            cuda.dense_q8_matmul(x, wc, out=y)
            x32 = x.float().cpu().numpy().reshape(n_tok, -1)
            ref = np.empty((n_tok, shape[1]), np.float32)
            dense.dense_q8(x32, wq.q, wq.scales, ref)
            sc = np.abs(x32.astype(np.float64)) @ w_abs
            rel = 2e-5 if od == torch.float32 else 1e-2
            check(y, ref.astype(np.float64), sc, rel)


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_channel_skip_matches_reference(shape, dtype, rng):
    w = rng.standard_normal(shape).astype(np.float16)
    wc = torch.from_numpy(w).cuda()
    for keep in (0.0, 0.01, 0.25, 0.5, 0.7, 1.0):
        for n_tok in (1, 2):
            x32 = rng.standard_normal((n_tok, shape[0])).astype(np.float32)
            x32[:, ::7] = np.round(x32[:, ::7])  # ties in |x| across the threshold
            x = torch.from_numpy(x32).to("cuda", DTYPES[dtype])
            x = x[0] if n_tok == 1 else x
            y = cuda.channel_skip_matmul(x, wc, keep)
            xr = x.float().cpu().numpy().reshape(n_tok, -1).astype(np.float64)
            k = cuda.keep_count(keep, shape[0])
            ref = np.zeros((n_tok, shape[1]))
            sc = np.zeros((n_tok, shape[1]))
            for t in range(n_tok):
                rows = kept_rows(xr[t].astype(np.float32), k)
                ref[t] = xr[t, rows] @ w[rows].astype(np.float64)
                sc[t] = np.abs(xr[t, rows]) @ np.abs(w[rows].astype(np.float64))
            check(y, ref, sc)


@gpu
@pytest.mark.parametrize("splits", [1, 3])
def test_channel_skip_every_row_equal(splits):
    """Every |x| equal: the first k rows by index, whatever the split count."""
    n_in, n_out, k = 1000, 64, 300
    w = torch.arange(n_in, dtype=torch.float32, device="cuda")[:, None].repeat(1, n_out)
    x = torch.ones(n_in, device="cuda")
    x[1::2] = -1
    y = cuda.channel_skip_matmul(x, (w / 1024).half(), k / n_in, splits=splits)
    want = sum((1 if i % 2 == 0 else -1) * i / 1024 for i in range(k))
    assert torch.allclose(y, torch.full_like(y, want), rtol=1e-6, atol=1e-6)


@gpu
def test_dense_kernels_deterministic_and_in_a_graph(rng):
    """The same bits eager and replayed in a CUDA graph, calls after calls."""
    w = (rng.standard_normal((4096, 1024)) * 0.02).astype(np.float16)
    wc, wq = torch.from_numpy(w).cuda(), cuda.to_device(pyeffort.quantize_dense_q8(w))
    x = torch.randn(4096, device="cuda").half()
    ya, yb = cuda.dense_q8_matmul(x, wq), cuda.channel_skip_matmul(x, wc, 0.3)
    ga, gb = torch.empty_like(ya), torch.empty_like(yb)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda.dense_q8_matmul(x, wq, out=ga), cuda.channel_skip_matmul(x, wc, 0.3, out=gb)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda.dense_q8_matmul(x, wq, out=ga)
        cuda.channel_skip_matmul(x, wc, 0.3, out=gb)
    for _ in range(3):
        ga.zero_(), gb.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(ga, ya) and torch.equal(gb, yb)
