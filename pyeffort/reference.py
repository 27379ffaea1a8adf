"""The specification of pyeffort, in plain numpy. Every kernel must compute what this computes.

Notation: ``y = x @ W``, ``W`` is ``(n_in, n_out)``; ``G = ceil(n_out / 16)`` groups of 16 outputs.

Buckets (built once per matrix)
    For input row ``i`` and group ``g`` the 16 weights ``W[i, 16g:16g+16]`` (zero-padded past
    ``n_out``) are ranked by ``|w|``, largest first, ties by lower position. Rank ``k`` of every
    group of input ``i`` forms the *bucket row* ``(k, i)``: ``G`` fp16 values and ``G`` 4-bit
    positions (0..15 inside the group), stored apart from the values (no truncation bias).
    Each row has a statistic, the root mean square of its real (unpadded) entries.
    With per-output weights ``a`` (n_out,) (``stat=rms_out_weighted``) the ranks and the
    statistic follow ``fp16(a_j * w_ij)`` instead: an output that matters more keeps its weights
    longer; the stored values are still the true weights.
    Rows are stored rank-major: all rank-0 rows, then rank-1 rows, ...; inside a rank the rows are
    ordered by statistic (largest first, ties by input). Row ``r = k * n_in + j`` is the ``j``-th
    row of rank ``k``; ``order[k, j]`` names its input and ``stats[k, j]`` its statistic. So any
    prefix of the rows is the most important part of the matrix, and a partial load keeps one.

Effort matmul (per token)
    For each loaded row ``s = |x[order[k, j]]| * stats[k, j]`` (float32 product). Row ``(k, i)`` carries ``m_k`` real
    multiplications (``G``, or ``G - 1`` for ranks that fall into the last group's padding).
    The budget is ``T = effort * n_in * n_out`` multiplications. The cutoff ``c`` is the largest
    value with ``sum(m_k for loaded rows with s >= c) >= T`` (``c = 0`` if the loaded rows cannot
    reach ``T``), and every loaded row with ``s >= c`` is dispatched; ``effort == 0`` dispatches
    nothing. Since ``stat`` falls with ``k``, input ``i`` always contributes a prefix of its ranks.
    ``y[16 g + pos] += x_i * w`` over the dispatched rows' entries, accumulated in float64 here
    (float32 in the kernels), returned as float32. The realised effort is the dispatched ``m_k``
    over ``n_in * n_out``; the bytes read are the dispatched rows' value and position bytes.

8-bit values (``values="q8"``, ``quantise_q8``)
    The bucket rows are built as above from the fp16 weights (ranks, positions, statistics and
    order unchanged); then every value is an int8 ``q`` times a scale shared by one *tier*
    (ranks ``4t .. 4t+3``) of one input over one *chunk* of 4 groups (64 outputs): 16 values.
    The scale is ``fp16(m / 127)`` for ``m`` the largest ``|w|`` of the 16, raised to the next
    fp16 when ``127 * scale < m`` (so no value is clipped; 0 when ``m == 0``), and
    ``q = clip(rint(w / scale), -127, 127)`` in float32. ``scales`` is fp16
    ``(4 n_in, ceil(G / 4))``: row ``t * n_in + j`` holds tier ``t`` of input ``order[4t, j]``,
    so the scales of a prefix of the rows are a prefix of ``scales`` (``scale_rows``). Effort
    1.0 is the full product of the dequantised values ``q * scale`` (exact in float32); the
    bytes read are each dispatched row's int8 values and positions plus, per dispatched tier of
    an input, its scales.
"""

from __future__ import annotations

import numpy as np

GROUP = 16  # outputs per group
N_RANKS = 16  # ranks per group = bucket rows per input

NAME = "numpy"


def n_groups(n_out: int) -> int:
    return (n_out + GROUP - 1) // GROUP


def row_mults(n_out: int) -> np.ndarray:
    """Real multiplications in a bucket row of each rank: (16,) int64."""
    g, r = n_groups(n_out), n_out % GROUP
    m = np.full(N_RANKS, g, dtype=np.int64)
    if r:
        m[r:] -= 1  # ranks r..15 of the last group are its zero padding
    return m


def row_bytes(n_groups_: int, q8: bool = False) -> int:
    """Bytes of one bucket row: fp16 (q8: int8) values plus packed 4-bit positions."""
    return (1 if q8 else 2) * n_groups_ + (n_groups_ + 1) // 2


TIER = 4  # ranks that share a q8 scale
CHUNK = 4  # groups that share a q8 scale (64 outputs)
Q8_MAX = 127


def n_chunks(n_groups_: int) -> int:
    return (n_groups_ + CHUNK - 1) // CHUNK


def scale_rows(n_rows: int, n_in: int) -> int:
    """Rows of ``scales`` a prefix of ``n_rows`` bucket rows needs (a prefix of them)."""
    t = n_rows // (TIER * n_in)
    return min(N_RANKS // TIER * n_in, t * n_in + min(n_in, n_rows - t * TIER * n_in))


def _tier_position(order: np.ndarray) -> np.ndarray:
    """(16, n_in) order -> (16, n_in): for bucket row (k, j) its row of ``scales``,
    t * n_in + (the place of input order[k, j] in order[4t]), t = k // 4."""
    n_in = order.shape[1]
    place = np.empty((N_RANKS // TIER, n_in), dtype=np.int64)  # by tier and input
    for t in range(N_RANKS // TIER):
        place[t, order[TIER * t]] = t * n_in + np.arange(n_in)
    return place[np.arange(N_RANKS)[:, None] // TIER, order]


def q8_scale(m: np.ndarray) -> np.ndarray:
    """The fp16 scale of blocks whose largest |w| is m (float32): fp16(m / 127), raised to the
    next fp16 where 127 times it falls short of m."""
    s = (m / np.float32(Q8_MAX)).astype(np.float16)
    short = s.astype(np.float32) * np.float32(Q8_MAX) < m
    return np.where(short, np.nextafter(s, np.float16(np.inf)), s).astype(np.float16)


def quantise_q8(values: np.ndarray, order: np.ndarray):
    """fp16 bucket rows (16 n_in, G) -> (int8 rows (16 n_in, G), fp16 scales (4 n_in,
    ceil(G/4))), as the module says. One tier at a time, its 4 ranks' rows gathered in the
    order of its first rank (the order of its scales)."""
    n_in, (rows, g) = order.shape[1], values.shape
    nc = n_chunks(g)
    place = np.empty((N_RANKS, n_in), dtype=np.int64)  # place[k, i]: input i's row in rank k
    place[np.arange(N_RANKS)[:, None], order] = np.arange(n_in)
    q = np.empty((rows, g), dtype=np.int8)
    scales = np.empty((N_RANKS // TIER * n_in, nc), dtype=np.float16)
    w = np.zeros((TIER, n_in, nc * CHUNK), dtype=np.float32)  # one tier, by rank, row, output
    for t in range(N_RANKS // TIER):
        ranks = range(TIER * t, TIER * t + TIER)
        for r, k in enumerate(ranks):
            w[r, :, :g] = values[k * n_in + place[k, order[TIER * t]]]
        w4 = w.reshape(TIER, n_in, nc, CHUNK)
        s16 = q8_scale(np.abs(w4).max(axis=(0, 3)))  # (n_in, nc): row t * n_in + j of scales
        scales[t * n_in : (t + 1) * n_in] = s16
        s = s16.astype(np.float32)
        s[s == 0] = 1  # a block of zeros: q = 0
        qt = np.clip(np.rint(w4 / s[None, :, :, None]), -Q8_MAX, Q8_MAX).astype(np.int8)
        qt = qt.reshape(TIER, n_in, nc * CHUNK)
        for r, k in enumerate(ranks):  # back to rank k's own row order
            q[k * n_in : (k + 1) * n_in] = qt[r, place[TIER * t, order[k]], :g]
    return q, scales


def dequantise(values: np.ndarray, scales, order: np.ndarray) -> np.ndarray:
    """Bucket rows (n_rows, G) -> their weights, float64 (fp16 values, or int8 * scale)."""
    if scales is None:
        return np.asarray(values).astype(np.float64)
    n_rows, g = values.shape
    srow = _tier_position(order).ravel()[:n_rows]  # scales row of every bucket row
    s = np.asarray(scales).astype(np.float32)[srow[:, None], (np.arange(g) // CHUNK)[None, :]]
    return (np.asarray(values).astype(np.float32) * s).astype(np.float64)


# ---------------------------------------------------------------- build


def build(w16: np.ndarray, out_weight: np.ndarray | None = None):
    """W (n_in, n_out) float16 -> values (16*n_in, G) f16, positions (16*n_in, ceil(G/2)) u8,
    stats (16, n_in) f32 and order (16, n_in) i32, both in row order.

    ``out_weight`` a (n_out,) float32 (the output-weighted statistic, ``stat=rms_out_weighted``):
    ranks and statistics follow the weighted weights ``fp16(a_j * w_ij)`` (float32 product
    rounded to float16) instead of ``w_ij``; the stored values stay the true weights."""
    n_in, n_out = w16.shape
    g = n_groups(n_out)
    padded = np.zeros((n_in, g * GROUP), dtype=np.float16)
    padded[:, :n_out] = w16
    padded = padded.reshape(n_in, g, GROUP)
    ranked = padded  # what ranks and statistics are computed from
    if out_weight is not None:
        weighted = (w16.astype(np.float32) * out_weight.astype(np.float32)).astype(np.float16)
        ranked = np.zeros_like(padded).reshape(n_in, g * GROUP)
        ranked[:, :n_out] = weighted
        ranked = ranked.reshape(n_in, g, GROUP)
    key = (ranked.view(np.uint16) & 0x7FFF).astype(np.int32)  # |w| as fp16 magnitude bits
    rank_to_pos = np.argsort(-key, axis=-1, kind="stable")  # (n_in, g, 16)
    vals = np.take_along_axis(padded, rank_to_pos, axis=-1).transpose(2, 0, 1)  # (16, n_in, g)
    pos = rank_to_pos.transpose(2, 0, 1).astype(np.uint8)
    v64 = np.take_along_axis(ranked, rank_to_pos, axis=-1).transpose(2, 0, 1).astype(np.float64)
    m = np.maximum(row_mults(n_out), 1)[:, None]  # a rank made only of padding has stat 0
    stats = np.sqrt((v64 * v64).sum(-1) / m).astype(np.float32)
    order = np.argsort(-stats, axis=1, kind="stable")  # (16, n_in): input of each row
    vals = np.take_along_axis(vals, order[:, :, None], axis=1)
    pos = np.take_along_axis(pos, order[:, :, None], axis=1)
    stats = np.take_along_axis(stats, order, axis=1)
    values = np.ascontiguousarray(vals.reshape(N_RANKS * n_in, g))
    positions = pack_nibbles(pos.reshape(N_RANKS * n_in, g))
    return values, positions, stats, order.astype(np.int32)


def pack_nibbles(p: np.ndarray) -> np.ndarray:
    """(rows, G) values 0..15 -> (rows, ceil(G/2)) u8; group 2b in the low nibble of byte b."""
    rows, g = p.shape
    q = np.zeros((rows, 2 * ((g + 1) // 2)), dtype=np.uint8)
    q[:, :g] = p
    return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))


def unpack_nibbles(q: np.ndarray, g: int) -> np.ndarray:
    """Inverse of pack_nibbles: (rows, ceil(G/2)) u8 -> (rows, G) u8."""
    out = np.empty((q.shape[0], 2 * q.shape[1]), dtype=np.uint8)
    out[:, 0::2] = q & 0x0F
    out[:, 1::2] = q >> 4
    return out[:, :g]


# ---------------------------------------------------------------- select


def cutoff(x32, stats, order, n_rows: int, n_out: int, effort: float):
    """One token -> (c, dispatched (n_rows,) bool over the loaded rows); c = inf if none."""
    if effort <= 0.0:
        return np.float32(np.inf), np.zeros(n_rows, dtype=bool)
    s = (np.abs(x32)[order] * stats).astype(np.float32).ravel()[:n_rows]
    m = np.repeat(row_mults(n_out), stats.shape[1])[:n_rows]
    budget = effort * float(stats.shape[1] * n_out)
    by_size = np.argsort(-s, kind="stable")
    cum = np.cumsum(m[by_size])
    hit = np.searchsorted(cum, budget, side="left")  # first index with cum >= budget
    c = np.float32(0.0) if hit >= len(cum) else s[by_size[hit]]
    return c, s >= c


# ---------------------------------------------------------------- matmul


def bucketmul(x32, values, positions, stats, order, n_out, effort, out, scales=None):
    """x (n_tokens, n_in) f32 -> out (n_tokens, n_out) f32. Returns (mults done, bytes read).
    ``scales``: the q8 scales when ``values`` are int8 (None for fp16 values)."""
    n_rows, g = values.shape
    n_in = stats.shape[1]
    m = np.repeat(row_mults(n_out), n_in)[:n_rows]
    pos = unpack_nibbles(np.asarray(positions), g).astype(np.int64)
    cols = GROUP * np.arange(g, dtype=np.int64)[None, :] + pos
    vals = dequantise(values, scales, order)
    inputs = order.ravel()[:n_rows]
    if not np.isfinite(x32).all():
        from pyeffort.errors import NonFiniteError

        raise NonFiniteError("x holds NaN or Inf; pyeffort.matmul needs finite inputs")
    mults = nbytes = 0
    for t in range(x32.shape[0]):
        _, disp = cutoff(x32[t], stats, order, n_rows, n_out, effort)
        r = np.nonzero(disp)[0]
        contrib = x32[t, inputs[r]].astype(np.float64)[:, None] * vals[r]
        y = np.bincount(cols[r].ravel(), weights=contrib.ravel(), minlength=g * GROUP)
        out[t] = y[:n_out]
        mults += int(m[r].sum())
        nbytes += len(r) * row_bytes(g, scales is not None)
        if scales is not None:  # a dispatched tier of an input reads its scales once
            tiers = np.unique(_tier_position(order).ravel()[:n_rows][r])
            nbytes += 2 * n_chunks(g) * len(tiers)
    return mults, nbytes


def dense_f16(x32: np.ndarray, w16: np.ndarray, out: np.ndarray) -> None:
    """x (n_tokens, n_in) f32 @ W (n_in, n_out) f16 -> out (n_tokens, n_out) f32."""
    out[...] = x32.astype(np.float64) @ np.asarray(w16).astype(np.float64)


def dense_rows_f16(x32: np.ndarray, w16: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """Channel skipping: x (n_tokens, n_in) f32 @ W (n_in, n_out) f16 over the inputs ``rows``
    (int32, each in 0..n_in-1) only -> out (n_tokens, n_out) f32."""
    r = np.asarray(rows, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= w16.shape[0]):
        from pyeffort.errors import ShapeError

        raise ShapeError(f"rows must lie in 0..{w16.shape[0] - 1}")
    xr = x32[:, r].astype(np.float64)
    out[...] = xr @ np.asarray(w16)[r].astype(np.float64)


def oracle(x: np.ndarray, w: np.ndarray, effort: float) -> np.ndarray:
    """The bound of element selection: keep exactly the largest |x_i * W_ij| products."""
    p = x.astype(np.float64)[:, None] * w.astype(np.float64)
    keep = round(effort * p.size)
    if keep <= 0:
        return np.zeros(w.shape[1])
    thr = np.partition(np.abs(p).ravel(), p.size - keep)[p.size - keep]
    return np.where(np.abs(p) >= thr, p, 0.0).sum(0)


# ---------------------------------------------------------------- decoding steps (one token)


def rmsnorm(x32: np.ndarray, w32: np.ndarray, eps: float, out: np.ndarray) -> None:
    """x (n,) f32, w (n,) f32 -> out (n,) f32: x / sqrt(mean(x^2) + eps) * w."""
    out[...] = x32 / np.sqrt(np.mean(x32 * x32) + np.float32(eps)) * w32


def silu_mul(g32: np.ndarray, u32: np.ndarray, out: np.ndarray) -> None:
    """g, u (n,) f32 -> out (n,) f32: silu(g) * u = g / (1 + exp(-g)) * u (SwiGLU)."""
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: silu(g) = -0
        out[...] = g32 / (np.float32(1) + np.exp(-g32)) * u32


def rope(x32: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """x (heads, hd) f32 rotated in place at one position: pairs (j, j + hd/2) ("rotate half"),
    cos and sin (hd/2,) of their angles."""
    h = x32.shape[1] // 2
    a, b = x32[:, :h].copy(), x32[:, h:].copy()
    x32[:, :h] = a * cos - b * sin
    x32[:, h:] = b * cos + a * sin


def attend(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, end: int, scale: float, out: np.ndarray
) -> None:
    """q (n_heads, hd) f32 against the cache k, v (n_kv, cap, hd) f32 at positions [lo, end) ->
    out (n_heads, hd): head t reads kv head t // (n_heads // n_kv); softmax of scale * q.k."""
    n_heads, hd = q.shape
    n_kv = k.shape[0]
    qq = q.reshape(n_kv, n_heads // n_kv, hd)
    s = (qq @ k[:, lo:end].transpose(0, 2, 1)) * np.float32(scale)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    out[...] = (s @ v[:, lo:end]).reshape(n_heads, hd)
