"""The CUDA backend's q8 host side on CPU tensors (no GPU needed): the torch quantiser equals
reference.quantise_q8 bit for bit, and the record repack, read with the kernel's own address
arithmetic and value conversion (src/cuda/rows.cuh), gives reference.bucketmul's products and
byte count. The kernels themselves run in tests/test_cuda.py on a GPU."""

import numpy as np
import pytest

import pyeffort
from pyeffort import reference

torch = pytest.importorskip("torch")
from pyeffort import cuda  # imports torch lazily; needs no GPU

SHAPES = [(40, 37), (64, 1000), (257, 300), (100, 7), (33, 64)]


def writable(a):
    return torch.from_numpy(np.require(a, requirements="W"))  # Buckets' arrays are read-only


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_quantiser_matches_reference(shape, weighted, rng):
    w = (rng.standard_normal(shape) * rng.lognormal(0, 2, (shape[0], 1))).astype(np.float16)
    w[::5, ::3] = 0  # blocks with zeros, and whole zero blocks below
    w[: shape[0] // 3, : min(shape[1], 64)] = 0
    w[1, 0] = 65504.0  # a scale of the largest block: 127 * fp16(m / 127) falls short of m
    a = np.exp(-np.abs(rng.standard_normal(shape[1]))).astype(np.float32) if weighted else None
    b = pyeffort.build_buckets(w, out_weight=a)
    want_q, want_s = reference.quantise_q8(b.values, b.order)
    got_q, got_s = cuda.quantise_q8(writable(b.values), writable(b.order))
    np.testing.assert_array_equal(got_q.numpy(), want_q)
    np.testing.assert_array_equal(got_s.numpy().view(np.uint16), want_s.view(np.uint16))
    q8 = pyeffort.build_buckets(w, out_weight=a, values="q8")
    np.testing.assert_array_equal(got_q.numpy(), q8.values)


def kernel_product(x32, wt, slot, rows, b, ct):
    """y = sum over `rows` (with their x) of x * w, reading wt as the q8 kernel does: tile at
    tile * scale_rows * QREC (pe_tile_base), record slot // 4 at record * QREC in it, thread
    t's scale at 2t, chunk slot % 4's values at ct/2 + chunk * QCB + 4t and nibbles at
    ct/2 + chunk * QCB + ct + 2t; q by the byte trick; (x * scale) * q. float64 sums of the
    float32 products."""
    qcb, qrec = 3 * ct // 2, 13 * ct // 2
    n_tiles, flat = -(-b.n_groups // ct), wt.reshape(-1)
    n_rec = reference.scale_rows(b.values.shape[0], b.n_in)
    t = np.arange(ct // 4)
    y = np.zeros(n_tiles * ct * 16)
    for r, xr in rows:
        rec, ch = int(slot[r]) >> 2, int(slot[r]) & 3
        for tile in range(n_tiles):
            base = tile * n_rec * qrec + rec * qrec
            f = flat
            sc = f[base + 2 * t] | f[base + 2 * t + 1].astype(np.uint16) << 8
            xs = np.float32(xr) * sc.astype(np.uint16).view(np.float16).astype(np.float32)
            o = base + ct // 2 + ch * qcb
            v = f[o + 4 * t[:, None] + np.arange(4)].astype(np.uint32)  # (ct/4, 4) bytes
            magic = (0x4B000000 | (v ^ 0x80)).astype(np.uint32).view(np.float32)
            q = magic - np.float32(8388736.0)
            nb = f[o + ct + 2 * t[:, None] + np.arange(2)]  # (ct/4, 2)
            pos = np.stack([nb[:, 0] & 15, nb[:, 0] >> 4, nb[:, 1] & 15, nb[:, 1] >> 4], 1)
            groups = tile * ct + 4 * t[:, None] + np.arange(4)
            np.add.at(y, 16 * groups + pos, (xs[:, None] * q).astype(np.float64))
    return y[: b.n_out]


@pytest.mark.parametrize("shape", [(40, 37), (64, 1000), (33, 7)])
@pytest.mark.parametrize("ct", [32, 64])
@pytest.mark.parametrize("loaded", [1.0, 0.3, 0.07])
def test_repack_read_as_the_kernel_reads_it(shape, ct, loaded, rng):
    """Every row's values, positions and scales where the kernel looks for them; a record's
    chunk 0 is dispatched exactly when any of its rows is, so dispatched chunks 0 count the
    reference's scale bytes; partial loads (a prefix of rows and scales)."""
    w = (rng.standard_normal(shape) * rng.lognormal(0, 1, (shape[0], 1))).astype(np.float16)
    w[:, -1:] *= 30  # an output column far larger: the padded ranks' statistics out of order
    full = pyeffort.build_buckets(w, values="q8")
    n_in, n_out = shape
    n_rows = max(1, int(16 * n_in * loaded))
    b = pyeffort.Buckets(
        full.values[:n_rows],
        full.positions[:n_rows],
        full.stats,
        full.order,
        n_out,
        scales=full.scales[: reference.scale_rows(n_rows, n_in)],
    )
    t = writable
    wt, slot = cuda.repack_q8(
        torch, t(b.values), t(b.positions), t(b.scales), t(b.stats), t(b.order), ct
    )
    wt, slot = wt.numpy(), slot.numpy()
    assert wt.shape == (-(-b.n_groups // ct), b.scales.shape[0], 13 * ct // 2)
    assert len(np.unique(slot)) == n_rows  # every row its own chunk
    inputs = b.order.ravel()[:n_rows]
    for effort in (0.05, 0.3, 0.6, 1.0):
        x = (rng.standard_normal((1, n_in)) * rng.random((1, n_in)) ** 3).astype(np.float32)
        x[0, ::4] = 0  # zero keys: ties
        ref = np.empty((1, n_out), np.float32)
        _, nbytes = reference.bucketmul(
            x, b.values, b.positions, b.stats, b.order, n_out, effort, ref, scales=b.scales
        )
        _, disp = reference.cutoff(x[0], b.stats, b.order, n_rows, n_out, effort)
        r = np.nonzero(disp)[0]
        y = kernel_product(x[0], wt, slot, [(i, x[0, inputs[i]]) for i in r], b, ct)
        scale = np.abs(x[0]).astype(np.float64) @ np.abs(b.to_dense().astype(np.float64))
        assert (np.abs(y - ref[0]) <= 2e-5 * scale + 1e-30).all()
        records = int(((slot[r] & 3) == 0).sum())  # what the kernel's tile 0 counts
        g = b.n_groups
        assert nbytes == len(r) * reference.row_bytes(g, True) + 2 * reference.n_chunks(g) * records
