"""Selection rules compared by the quality harness, each on one matrix and a batch of tokens.

Every rule is ``rule(x (T, n_in) f32, state: MatrixState, effort) -> (y (T, n_out) f32, mults,
bytes)``: ``mults`` the multiplications done and ``bytes`` the weight bytes read, summed over the
T tokens (realised effort = mults / (T * n_in * n_out)). Each token picks its own selection.

- ``pyeffort``  the default rule: ``pyeffort.matmul`` on the layer's Buckets (their row statistic,
  RMS or output-weighted RMS, exact cutoff); ``bucket_twin`` is its vectorised numpy twin (the
  same ranks and statistics, read from the Buckets, the same selection, BLAS products).
- ``original``  the 2024 Effort rule: mean-|w| row statistic, positions truncated into the 4 low
  fp16 mantissa bits, cutoff from 4096-style probes (the diagonal), so the effort is missed.
- ``original_exact``  the same statistic and truncation with an exact budget (an ablation).
- ``teal``  whole input channels with the largest |x_i|, fraction ``effort`` of them.
- ``wina``  whole input channels ranked by |x_i| * ||W_i,:||_2.
- ``int8``  dense int8 weights, one scale per output channel (ignores effort; equal-bytes point).
- ``oracle`` per token, the largest |x_i * W_ij| products of the matrix (to a 1/64-octave
  threshold; the realised effort is counted exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pyeffort import reference

GROUP = reference.GROUP
N_RANKS = reference.N_RANKS
BIN = 64  # oracle threshold bins per octave


class MatrixState:
    """One matrix W (n_in, n_out) float16 and whatever each rule precomputes from it (lazily).

    ``buckets``: the layer's ``pyeffort.Buckets``, or a function returning them (the default rule
    runs on them); built from ``w16`` when None.
    """

    def __init__(self, w16: np.ndarray, buckets=None, name: str = ""):
        self.w16 = np.ascontiguousarray(w16, dtype=np.float16)  # (n_in, n_out)
        self.n_in, self.n_out = self.w16.shape
        self.name = name
        self._buckets = buckets
        self._cache: dict = {}

    @property
    def size(self) -> int:
        return self.n_in * self.n_out

    def get(self, key: str, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def w32(self) -> np.ndarray:
        return self.get("w32", lambda: self.w16.astype(np.float32))

    @property
    def buckets(self):
        if callable(self._buckets):
            self._buckets = self._buckets()
        if self._buckets is None:
            from pyeffort import build_buckets

            self._buckets = build_buckets(self.w16)
        return self._buckets

    def ranks(self) -> np.ndarray:
        """(n_in, n_out) uint8: the rank of each weight inside its group of 16 (reference ties)."""

        def make():
            g = reference.n_groups(self.n_out)
            pad = np.zeros((self.n_in, g * GROUP), dtype=np.float16)
            pad[:, : self.n_out] = self.w16
            key = (pad.reshape(self.n_in, g, GROUP).view(np.uint16) & 0x7FFF).astype(np.int32)
            r2p = np.argsort(-key, axis=-1, kind="stable")
            rank = np.empty_like(r2p)
            np.put_along_axis(rank, r2p, np.arange(GROUP)[None, None, :], axis=-1)
            return rank.reshape(self.n_in, g * GROUP)[:, : self.n_out].astype(np.uint8)

        return self.get("ranks", make)

    def row_stats(self, stat: str = "rms", w16: np.ndarray | None = None) -> np.ndarray:
        """(16, n_in) float32: the statistic of bucket row (k, i), in input order."""

        def make():
            w = (self.w16 if w16 is None else w16).astype(np.float64)
            rank = self.ranks()
            m = np.maximum(reference.row_mults(self.n_out), 1)
            out = np.zeros((N_RANKS, self.n_in))
            for k in range(N_RANKS):
                sel = rank == k
                v = np.where(sel, np.abs(w) if stat == "mean" else w * w, 0.0).sum(1) / m[k]
                out[k] = v if stat == "mean" else np.sqrt(v)
            return out.astype(np.float32)

        return self.get(f"stats_{stat}_{w16 is None}", make)

    def bucket_selection(self) -> tuple[np.ndarray, np.ndarray]:
        """What ``pyeffort.matmul`` selects by, read from the (fully loaded) Buckets: the rank
        of each weight (n_in, n_out) uint8 and the row statistics (16, n_in) f32 by input."""

        def make():
            b = self.buckets
            g = reference.n_groups(self.n_out)
            pos = reference.unpack_nibbles(np.asarray(b.positions), g).astype(np.int64)
            rank = np.empty((self.n_in, g * GROUP), dtype=np.uint8)
            stats = np.empty((N_RANKS, self.n_in), dtype=np.float32)
            cols = GROUP * np.arange(g)[None, :]
            for k in range(N_RANKS):
                inputs = b.order[k].astype(np.int64)
                rank[inputs[:, None], cols + pos[k * self.n_in : (k + 1) * self.n_in]] = k
                stats[k, inputs] = b.stats[k]
            return np.ascontiguousarray(rank[:, : self.n_out]), stats

        return self.get("bucket_selection", make)


def _prefix_product(
    x, state: MatrixState, keep_ranks: np.ndarray, w32: np.ndarray, rank: np.ndarray | None = None
) -> np.ndarray:
    """y_t = sum over inputs i of x_ti * (the weights of row i with rank < keep_ranks[t, i]);
    ``rank`` the rank of each weight (default: by abs(w), ``state.ranks()``)."""
    rank = state.ranks() if rank is None else rank
    pinned = w32 is state._cache.get("stack_of") and rank is state._cache.get("stack_ranks")
    stack = state._cache.get("rank_stack") if pinned else None
    y = np.zeros((x.shape[0], state.n_out), dtype=np.float32)
    for k in range(int(keep_ranks.max(initial=0))):
        xk = np.where(keep_ranks > k, x, 0.0).astype(np.float32)  # (T, n_in)
        y += xk @ (stack[k] if stack is not None else np.where(rank == k, w32, 0.0))
    return y


def pin_rank_stack(state: MatrixState) -> np.ndarray:
    """Keep W split by the Buckets' ranks, (16, n_in, n_out) float32, for many calls of
    ``bucket_twin`` in a row (unpin after: 16x the matrix in memory). Returns the float32 W the
    stack belongs to."""
    w32 = state.w32
    rank = state.bucket_selection()[0]
    state._cache["rank_stack"] = np.stack([np.where(rank == k, w32, 0.0) for k in range(N_RANKS)])
    state._cache["stack_of"], state._cache["stack_ranks"] = w32, rank
    return w32


def unpin_rank_stack(state: MatrixState) -> None:
    for k in ("rank_stack", "stack_of", "stack_ranks"):
        state._cache.pop(k, None)


def _exact_budget_ranks(x, stats_in: np.ndarray, n_out: int, effort: float) -> np.ndarray:
    """Exact-budget cutoff on |x_i| * stat(k, i) -> (T, n_in) ranks kept per input (prefixes)."""
    t_n, n_in = x.shape
    if effort <= 0.0:
        return np.zeros((t_n, n_in), dtype=np.int64)
    s = (np.abs(x)[:, None, :] * stats_in[None]).astype(np.float32).reshape(t_n, -1)
    m = np.repeat(reference.row_mults(n_out), n_in)  # rank-major like s
    budget = effort * float(n_in * n_out)
    if np.all(m == m[0]):
        rows = min(math.ceil(budget / m[0] - 1e-9), s.shape[1])
        c = np.partition(s, s.shape[1] - rows, axis=1)[:, s.shape[1] - rows]
    else:  # uneven rows: the reference's weighted search, token by token
        c = np.empty(t_n, dtype=np.float32)
        for t in range(t_n):
            by = np.argsort(-s[t], kind="stable")
            hit = np.searchsorted(np.cumsum(m[by]), budget, side="left")
            c[t] = 0.0 if hit >= len(by) else s[t, by[hit]]
    disp = s.reshape(t_n, N_RANKS, n_in) >= c[:, None, None]
    return disp.sum(1)


def _bucket_mults_bytes(keep: np.ndarray, n_out: int) -> tuple[int, int]:
    m = reference.row_mults(n_out)
    cm = np.concatenate([[0], np.cumsum(m)])
    g = reference.n_groups(n_out)
    return int(cm[keep].sum()), int(keep.sum()) * reference.row_bytes(g)


# ---------------------------------------------------------------- the rules


def pyeffort_rule(x, state: MatrixState, effort: float):
    """The default rule, through the public API (whichever backend is active)."""
    import pyeffort

    e = min(max(float(effort), 0.0), 1.0)
    y, info = pyeffort.matmul(
        np.ascontiguousarray(x, np.float32), state.buckets, e, return_info=True
    )
    return y, info.mults, info.bytes_read


def q8_buckets(state: MatrixState):
    """The layer's Buckets with their values quantised to q8 (``reference.quantise_q8``: the
    same ranks, statistics and order; what ``build_buckets(W, values="q8")`` makes)."""

    def make():
        import pyeffort
        from pyeffort import reference

        b = state.buckets
        if b.values_kind == "q8":
            return b
        q, scales = reference.quantise_q8(np.asarray(b.values), np.asarray(b.order))
        return pyeffort.Buckets(q, b.positions, b.stats, b.order, b.n_out, b.source_dtype,
                                b.stat, scales=scales)  # fmt: skip

    return state.get("q8_buckets", make)


def pyeffort_q8_rule(x, state: MatrixState, effort: float):
    """The default rule on 8-bit values (the layer's buckets quantised), through the public
    API: its KL is against the exact fp16 model, so it includes the quantisation."""
    import pyeffort

    e = min(max(float(effort), 0.0), 1.0)
    y, info = pyeffort.matmul(
        np.ascontiguousarray(x, np.float32), q8_buckets(state), e, return_info=True
    )
    return y, info.mults, info.bytes_read


def bucket_twin(x, state: MatrixState, effort: float):
    """The default rule's selection (the Buckets' ranks and statistics, exact cutoff) with BLAS
    products."""
    e = min(max(float(effort), 0.0), 1.0)
    rank, stats = state.bucket_selection()
    keep = _exact_budget_ranks(x, stats, state.n_out, e)
    y = _prefix_product(x, state, keep, state._cache.get("stack_of", state.w32), rank)
    return (y, *_bucket_mults_bytes(keep, state.n_out))


def _truncated(state: MatrixState) -> np.ndarray:
    """W with each weight's 4-bit group position written into its 4 low mantissa bits."""

    def make():
        bits = state.w16.view(np.uint16)
        pos = (np.arange(state.n_out) % GROUP).astype(np.uint16)[None, :]
        return ((bits & np.uint16(0xFFF0)) | pos).view(np.float16)

    return state.get("truncated", make)


def original_rule(x, state: MatrixState, effort: float):
    """Mean-|w| statistic, truncated values, cutoff from the diagonal probes' |x_i * w_ii|."""
    wt = _truncated(state)
    stats = state.row_stats("mean", wt)
    e = min(max(float(effort), 0.0), 1.0)
    n_in = state.n_in
    probe = np.abs(wt[np.arange(n_in), np.arange(n_in) % state.n_out].astype(np.float32))
    p = np.sort(np.abs(x) * probe[None, :], axis=1)[:, ::-1]  # (T, n_in) descending
    idx = min(int(e * n_in), n_in - 1)
    c = p[:, idx] if e > 0 else np.full(x.shape[0], np.inf, np.float32)
    s = np.abs(x)[:, None, :] * stats[None]  # (T, 16, n_in)
    keep = (s > c[:, None, None]).sum(1)
    y = _prefix_product(x, state, keep, wt.astype(np.float32))
    return (y, *_bucket_mults_bytes(keep, state.n_out))


def original_exact_rule(x, state: MatrixState, effort: float):
    """The original's statistic and truncation with pyeffort's exact budget (ablation)."""
    wt = _truncated(state)
    e = min(max(float(effort), 0.0), 1.0)
    keep = _exact_budget_ranks(x, state.row_stats("mean", wt), state.n_out, e)
    y = _prefix_product(x, state, keep, wt.astype(np.float32))
    return (y, *_bucket_mults_bytes(keep, state.n_out))


def _channel_rule(x, state: MatrixState, effort: float, score: np.ndarray):
    t_n, n_in = x.shape
    k = round(min(max(float(effort), 0.0), 1.0) * n_in)
    if k <= 0:
        return np.zeros((t_n, state.n_out), np.float32), 0, 0
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]  # (T, k) the k largest scores
    mask = np.zeros_like(x, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    y = np.where(mask, x, 0.0).astype(np.float32) @ state.w32
    return y, t_n * k * state.n_out, t_n * k * state.n_out * 2


def teal_rule(x, state: MatrixState, effort: float):
    """TEAL: the fraction ``effort`` of input channels with the largest |x_i|, dense rows."""
    return _channel_rule(x, state, effort, np.abs(x))


def wina_rule(x, state: MatrixState, effort: float):
    """WINA: input channels ranked by |x_i| * ||W_i,:||_2, dense rows."""
    norms = state.get("row_norms", lambda: np.linalg.norm(state.w32, axis=1))
    return _channel_rule(x, state, effort, np.abs(x) * norms[None, :])


def int8_weights(state: MatrixState) -> np.ndarray:
    """W quantised to int8 with one float16 scale per output channel, dequantised (n_in, n_out)."""

    def make():
        w = state.w32
        scale = (np.abs(w).max(0) / 127.0).astype(np.float16).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(w / scale), -127, 127)
        return (q * scale).astype(np.float32)

    return state.get("int8", make)


def int8_rule(x, state: MatrixState, effort: float):
    """Dense int8 weight-only product; the effort is ignored (all multiplications done)."""
    y = x.astype(np.float32) @ int8_weights(state)
    t_n = x.shape[0]
    return y, t_n * state.size, t_n * (state.size + 2 * state.n_out)


def q8_0_rule(x, state: MatrixState, effort: float):
    """The dense 8-bit baseline (ggml's Q8_0 layout: one fp16 scale per 32 inputs of an
    output; ``pyeffort.dense_matmul`` on ``quantize_dense_q8(W)``); the effort is ignored."""
    import pyeffort
    from pyeffort.dense import quantize_dense_q8

    wq = state.get("q8_0", lambda: quantize_dense_q8(state.w16))
    y = pyeffort.dense_matmul(np.ascontiguousarray(x, np.float32), wq)
    t_n = x.shape[0]
    return y, t_n * state.size, t_n * wq.nbytes


def _oracle_tables(state: MatrixState):
    """Per input row, the count of |w_ij| at or above each 1/64-octave bin, from the top."""

    def make():
        a = np.abs(state.w32)
        nz = a > 0
        raw = np.floor(BIN * np.log2(np.where(nz, a, 1.0))).astype(np.int64)
        off = int(raw[nz].min()) - 1 if nz.any() else 0
        b = np.where(nz, raw - off, 0)  # bin 0 holds the zeros
        nb = int(b.max()) + 2
        hist = np.zeros((state.n_in, nb), np.int64)
        np.add.at(hist, (np.repeat(np.arange(state.n_in), state.n_out), b.ravel()), 1)
        ge = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1].astype(np.int32)  # ge[i, b] = #{j: bin >= b}
        return off, ge

    return state.get("oracle", make)


def oracle_rule(x, state: MatrixState, effort: float, chunk: int = 8):
    """Per token, the products |x_i W_ij| above a threshold found on 1/64-octave bins so that
    their count first reaches ``effort * n_in * n_out``."""
    t_n = x.shape[0]
    e = min(max(float(effort), 0.0), 1.0)
    y = np.zeros((t_n, state.n_out), np.float32)
    if e <= 0:
        return y, 0, 0
    if e >= 1:
        return dense_rule(x, state, 1.0)
    off, ge = _oracle_tables(state)
    nb = ge.shape[1]
    ax = np.abs(x).astype(np.float64)
    pos = ax > 0
    sx = np.floor(BIN * np.log2(np.where(pos, ax, 1.0))).astype(np.int64)  # (T, n_in)
    budget = e * state.size
    rows = np.arange(state.n_in)[None, :]

    def count(bidx):  # products with bin(x_i) + bin(w_ij) >= bidx, per token
        j = np.clip(bidx[:, None] - sx - off, 1, nb - 1)  # column 0 would count the zeros
        return np.where(pos, ge[rows, j], 0).sum(1)

    hi_b = np.full(t_n, sx.max() + off + nb)  # count(hi) == 0 < budget
    lo_b = np.full(t_n, sx.min() + off)  # count(lo) == every nonzero product
    while np.any(hi_b - lo_b > 1):
        mid = (hi_b + lo_b) // 2
        ok = count(mid) >= budget
        lo_b = np.where(ok, mid, lo_b)
        hi_b = np.where(ok, hi_b, mid)
    thr = np.exp2(lo_b / BIN)  # |p| >= thr holds the count(lo_b) products and a 2/64-octave band
    w = state.w32
    mults = 0
    for s in range(0, t_n, chunk):
        xc = x[s : s + chunk].astype(np.float32)
        p = xc[:, :, None] * w[None]  # (c, n_in, n_out)
        keep = np.abs(p) >= thr[s : s + chunk, None, None].astype(np.float32)
        y[s : s + chunk] = np.where(keep, p, 0.0).sum(1)
        mults += int(keep.sum())
    return y, mults, mults * 2


def dense_rule(x, state: MatrixState, effort: float):
    """The exact product (fp16 weights, float32 accumulation): the reference model."""
    t_n = x.shape[0]
    return x.astype(np.float32) @ state.w32, t_n * state.size, t_n * state.size * 2


SPLIT_RULES = ("pyeffort", "pyeffort_q8", "bucket_twin")  # rules the budget split applies to

RULES: dict[str, Callable] = {
    "pyeffort": pyeffort_rule,
    "pyeffort_q8": pyeffort_q8_rule,
    "bucket_twin": bucket_twin,
    "original": original_rule,
    "original_exact": original_exact_rule,
    "teal": teal_rule,
    "wina": wina_rule,
    "int8": int8_rule,
    "q8_0": q8_0_rule,
    "oracle": oracle_rule,
    "dense": dense_rule,
}
