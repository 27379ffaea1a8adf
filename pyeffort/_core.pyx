# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled core: thin wrappers over src/cpu. Inputs are validated in pyeffort/_validate.py;
C status codes become exceptions here, in one place (_check)."""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t

from pyeffort.errors import DTypeError, ShapeError, status_error

cdef extern from "pyeffort.h" nogil:
    ctypedef enum pe_status:
        PE_OK
        PE_ERR_ALLOC
        PE_ERR_NONFINITE
        PE_ERR_ARG
        PE_ERR_THREAD
        PE_ERR_FORMAT
    ctypedef enum pe_values:
        PE_VALUES_F16
        PE_VALUES_Q8
    ctypedef struct pe_buckets:
        const void *values
        const uint8_t *positions
        const float *stats
        const int32_t *order
        int64_t n_in, n_out, n_groups, n_rows
        const uint16_t *scales
        pe_values kind
    pe_status pe_build_f16(const uint16_t *w, int64_t n_in, int64_t n_out, uint16_t *values,
                           uint8_t *positions, float *stats, int32_t *order)
    pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                           int64_t n_out, float *y)
    pe_status pe_dense_rows_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                                int64_t n_out, const int32_t *rows, int64_t n_rows, float *y)
    ctypedef struct pe_packed:
        pass
    pe_status pe_pack(const pe_buckets *b, pe_packed **out)
    void pe_packed_free(pe_packed *p)
    void pe_warm_packed(const pe_packed *const *ps, int n)
    pe_status pe_bucketmul(const pe_packed *p, const pe_buckets *b, const float *x,
                           int64_t n_tokens, double effort, float *y, int64_t *mults,
                           int64_t *bytes)
    int PE_MAX_GROUP
    pe_status pe_bucketmul_group(int n, const pe_packed *const *ps, const pe_buckets *const *bs,
                                 const float *x, const double *efforts, float *const *ys,
                                 int64_t *mults, int64_t *bytes)
    const char *pe_packed_copy(const pe_packed *p)
    const char *pe_kernel_name()
    const char *pe_cpu_features()
    const char *pe_available_kernels()
    pe_status pe_use_kernel(const char *name)
    int pe_num_threads()
    void pe_set_num_threads(int n)
    void pe_rmsnorm_f32(const float *x, const float *w, int64_t n, float eps, float *out)
    void pe_silu_mul_f32(const float *g, const float *u, int64_t n, float *out)
    void pe_rope_f32(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin)
    pe_status pe_attend_f32(const float *q, const float *k, const float *v, int64_t n_heads,
                            int64_t n_kv, int64_t cap, int64_t hd, int64_t lo, int64_t end,
                            float scale, float *out)

NAME = "c"
pe_kernel_name()  # CPU features are detected once, here at import (cpuid and xgetbv)


cdef int _check(pe_status st, str detail="") except -1:
    """The one place where C status codes turn into Python exceptions (errors.status_error)."""
    if st != PE_OK:
        raise status_error(st, "pyeffort C core", detail)
    return 0


_DAMAGED = ("the matrix data is damaged: repeated positions in a group, values that are not "
            "finite or int8 values of -128, or q8 scales that are not finite or negative, which "
            "no fast layout can hold")


def build(w16):
    """W (n_in, n_out) float16 -> (values, positions, stats, order), as reference.build."""
    import numpy as np

    cdef int64_t n_in = w16.shape[0], n_out = w16.shape[1]
    g = (n_out + 15) // 16
    values = np.empty((16 * n_in, g), dtype=np.float16)
    positions = np.empty((16 * n_in, (g + 1) // 2), dtype=np.uint8)
    stats = np.empty((16, n_in), dtype=np.float32)
    order = np.empty((16, n_in), dtype=np.int32)
    cdef const uint16_t[:, ::1] w = w16.view(np.uint16)
    cdef uint16_t[:, ::1] v = values.view(np.uint16)
    cdef uint8_t[:, ::1] p = positions
    cdef float[:, ::1] s = stats
    cdef int32_t[:, ::1] o = order
    cdef pe_status st
    with nogil:
        st = pe_build_f16(&w[0, 0], n_in, n_out, &v[0, 0], &p[0, 0], &s[0, 0], &o[0, 0])
    _check(st)
    return values, positions, stats, order


cdef class _Packed:
    """The input-major index of one matrix and the in-memory copy its kernel set reads
    (src/cpu/layout/index.c), owned here and freed with it."""

    cdef pe_packed *p
    cdef pe_buckets b  # pointers into the canonical arrays: valid while refs name them alive
    cdef object refs  # weak references to the canonical arrays it was built from

    def __dealloc__(self):
        pe_packed_free(self.p)


# (id(values), kernel set) -> _Packed: each kernel set reads its own in-memory copy; an entry
# leaves when its values array is collected
_packed = {}


def _scale_rows(int64_t n_rows, int64_t n_in):
    """Rows of scales that a prefix of n_rows bucket rows reads (reference.scale_rows)."""
    cdef int64_t t = n_rows // (4 * n_in)
    return min(4 * n_in, t * n_in + min(n_in, n_rows - 4 * t * n_in))


cdef pe_buckets _view(values, positions, stats, order, int64_t n_out, scales, keep):
    """The arrays as a pe_buckets: fp16 values (scales None) or int8 values with their fp16
    scales (q8: at least reference.scale_rows rows of ceil(G / 4))."""
    import numpy as np

    cdef const uint16_t[:, ::1] v
    cdef const int8_t[:, ::1] v8
    cdef const uint16_t[:, ::1] sc
    cdef const uint8_t[:, ::1] p = positions
    cdef const float[:, ::1] s = stats
    cdef const int32_t[:, ::1] o = order
    cdef pe_buckets b
    keep.extend([p, s, o])
    b.positions = &p[0, 0] if p.shape[0] else NULL
    b.stats = &s[0, 0]
    b.order = &o[0, 0]
    b.n_in = s.shape[1]
    b.n_out = n_out
    b.n_groups = values.shape[1]
    b.n_rows = values.shape[0]
    b.scales = NULL
    b.kind = PE_VALUES_F16
    if values.dtype == np.int8:
        if scales is None or scales.dtype != np.float16 or scales.ndim != 2:
            raise DTypeError("int8 bucket values need their scales: a 2-D float16 array")
        need = (_scale_rows(b.n_rows, b.n_in), (b.n_groups + 3) // 4)
        if scales.shape[0] < need[0] or scales.shape[1] != need[1]:
            raise ShapeError(f"scales {tuple(scales.shape)}: {b.n_rows} rows of int8 values over "
                             f"{b.n_groups} groups read ({need[0]} or more, {need[1]})")
        v8 = values
        sc = scales.view(np.uint16)
        keep.extend([v8, sc])
        b.values = &v8[0, 0] if v8.shape[0] else NULL
        b.scales = &sc[0, 0] if sc.shape[0] else NULL
        b.kind = PE_VALUES_Q8
    else:
        if scales is not None:
            raise DTypeError(f"{values.dtype} bucket values take no scales (int8 values do)")
        v = values.view(np.uint16)
        keep.append(v)
        b.values = &v[0, 0] if v.shape[0] else NULL
    return b


cdef _Packed _packed_for(values, positions, stats, order, int64_t n_out, scales=None):
    """The index of these canonical arrays (and scales, for int8 values), built at first use
    and cached (with their views: the cache hit is the per-call path, about 1 us)."""
    key = (id(values), pe_kernel_name())
    cdef _Packed pk = _packed.get(key)
    if pk is not None:
        r = pk.refs
        if (r[0]() is values and r[1]() is positions and r[2]() is stats and r[3]() is order
                and (r[4]() if r[4] is not None else None) is scales):
            return pk
    import weakref

    arrays = (values, positions, stats, order, scales)
    keep = []
    cdef pe_buckets b = _view(values, positions, stats, order, n_out, scales, keep)
    cdef pe_packed *raw = NULL
    cdef pe_status st
    with nogil:
        st = pe_pack(&b, &raw)
    _check(st, _DAMAGED if st == PE_ERR_FORMAT else "")
    pk = _Packed()
    pk.p = raw
    pk.b = b
    pk.refs = tuple(None if a is None else weakref.ref(a) for a in arrays)
    _packed[key] = pk
    weakref.finalize(values, _packed.pop, key, None)
    return pk


def _matrix(mat):
    """(values, positions, stats, order, n_out, scales): a matrix's arrays (scales None for
    fp16 values)."""
    if len(mat) != 6:
        raise ShapeError("a matrix is (values, positions, stats, order, n_out, scales)")
    return tuple(mat)


def warm(mats):
    """Starts an idle pool thread reading the matrices' statistics, then their in-memory
    copies, into the caches; mats: (values, positions, stats, order, n_out, scales), at most
    8."""
    cdef const pe_packed *ps[8]
    cdef int n = 0
    for mat in mats[:8]:
        values, positions, stats, order, n_out, scales = _matrix(mat)
        ps[n] = (<_Packed>_packed_for(values, positions, stats, order, n_out, scales)).p
        n += 1
    pe_warm_packed(ps, n)


def prepare(values, positions, stats, order, int64_t n_out, scales=None):
    """Builds now the in-memory copy the kernels in use read (else built at the first call)."""
    _packed_for(values, positions, stats, order, n_out, scales)


def copy_kind(values, positions, stats, order, int64_t n_out, scales=None):
    """The weights the kernels in use read for this matrix: "tiered", "permuted" (in-memory
    copies) or "canonical" (the rows in place, through the index: the scalar spec)."""
    return pe_packed_copy(_packed_for(values, positions, stats, order, n_out, scales).p).decode()


def bucketmul(x32, values, positions, stats, order, int64_t n_out, double effort, out,
              scales=None):
    """x (n_tokens, n_in) f32 -> out (n_tokens, n_out) f32; returns (mults, bytes). scales:
    the q8 scales of int8 values (reference.quantise_q8), None for fp16 values."""
    cdef const float[:, ::1] x = x32
    cdef float[:, ::1] y = out
    cdef int64_t mults = 0, nbytes = 0
    cdef pe_status st
    cdef _Packed pk = _packed_for(values, positions, stats, order, n_out, scales)
    with nogil:
        st = pe_bucketmul(pk.p, &pk.b, &x[0, 0], x.shape[0], effort, &y[0, 0], &mults, &nbytes)
    _check(st)
    return mults, nbytes


def bucketmul_group(x32, mats, efforts, outs):
    """One token x (n_in,) f32 @ each matrix of mats ((values, positions, stats, order, n_out,
    scales), one n_in, at most MAX_GROUP; fp16 and q8 members mixed) at its effort -> outs[j]
    (n_out_j,) f32; returns [(mults, bytes)]: the same as one bucketmul call per matrix (the
    searches and kernels in one pool job)."""
    cdef int n = len(mats), j
    if n < 1 or n > PE_MAX_GROUP:
        raise ValueError(f"a group has 1 to {PE_MAX_GROUP} matrices, got {n}")
    cdef const float[::1] x = x32
    cdef const pe_packed *ps[8]
    cdef const pe_buckets *bp[8]
    cdef pe_buckets bs[8]
    cdef float *ys[8]
    cdef double es[8]
    cdef int64_t mults[8]
    cdef int64_t nbytes[8]
    cdef float[::1] y
    cdef _Packed pk
    cdef pe_status st
    keep = []
    for j in range(n):
        values, positions, stats, order, n_out, scales = _matrix(mats[j])
        pk = _packed_for(values, positions, stats, order, n_out, scales)
        keep.append(pk)
        ps[j] = pk.p
        bs[j] = pk.b
        bp[j] = &bs[j]
        y = outs[j]
        ys[j] = &y[0]
        es[j] = efforts[j]
        mults[j] = nbytes[j] = 0
    with nogil:
        st = pe_bucketmul_group(n, ps, bp, &x[0], es, ys, mults, nbytes)
    _check(st)
    return [(mults[j], nbytes[j]) for j in range(n)]


MAX_GROUP = PE_MAX_GROUP


def dense_f16(x32, w16, out):
    """x (n_tokens, n_in) f32 @ W (n_in, n_out) f16 -> out (n_tokens, n_out) f32."""
    import numpy as np

    cdef const float[:, ::1] x = x32
    cdef const uint16_t[:, ::1] w = w16.view(np.uint16)
    cdef float[:, ::1] y = out
    cdef pe_status st
    with nogil:
        st = pe_dense_f16(&x[0, 0], &w[0, 0], x.shape[0], w.shape[0], w.shape[1], &y[0, 0])
    _check(st)


def dense_rows_f16(x32, w16, rows, out):
    """x (n_tokens, n_in) f32 @ W[rows] (n_in, n_out) f16 over the inputs rows (int32) only
    -> out (n_tokens, n_out) f32 (channel skipping; reference.dense_rows_f16)."""
    import numpy as np

    cdef const float[:, ::1] x = x32
    cdef const uint16_t[:, ::1] w = w16.view(np.uint16)
    cdef const int32_t[::1] r = np.ascontiguousarray(rows, dtype=np.int32)
    cdef float[:, ::1] y = out
    cdef const int32_t *rp = &r[0] if r.shape[0] else NULL
    cdef int32_t dummy = 0
    cdef pe_status st
    if x.shape[1] != w.shape[0] or y.shape[0] != x.shape[0] or y.shape[1] != w.shape[1]:
        raise ShapeError("dense_rows_f16: x (n_tokens, n_in), W (n_in, n_out), out (n_tokens, n_out)")
    if x.shape[0] == 0 or w.shape[1] == 0:
        return
    if r.shape[0] == 0:
        rp = &dummy
    with nogil:
        st = pe_dense_rows_f16(&x[0, 0], &w[0, 0], x.shape[0], w.shape[0], w.shape[1], rp,
                               r.shape[0], &y[0, 0])
    _check(st, f"rows must lie in 0..{w.shape[0] - 1}" if st == PE_ERR_ARG else "")


def kernel_name():
    return pe_kernel_name().decode()


def cpu_features():
    """The CPU features detected at import, space separated."""
    return pe_cpu_features().decode()


def available_kernels():
    """The kernel sets this machine runs (after PYEFFORT_DISABLE_CPU_FEATURES): the SIMD ones
    best first, then the portable ones: scalar (the spec), scalar-tiered, scalar-permuted (the
    scalar kernels of the in-memory layouts)."""
    return pe_available_kernels().decode().split(",")


def use_kernel(str name):
    """Force a kernel set by name (one of available_kernels()); for tests and benchmarks."""
    if pe_use_kernel(name.encode()) != PE_OK:
        raise ValueError(f"kernel {name!r} is not available here; have {available_kernels()}")


def num_threads():
    return pe_num_threads()


def set_num_threads(int n):
    pe_set_num_threads(n)


# ---------------------------------------------------------------- decoding steps (one token)


def rmsnorm(x32, w32, float eps, out):
    """x (n,) f32, w (n,) f32 -> out (n,) f32: x / sqrt(mean(x^2) + eps) * w (reference.rmsnorm)."""
    cdef const float[::1] x = x32
    cdef const float[::1] w = w32
    cdef float[::1] y = out
    if w.shape[0] != x.shape[0] or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ShapeError(f"rmsnorm: x {x.shape[0]}, w {w.shape[0]}, out {y.shape[0]}: one length > 0")
    with nogil:
        pe_rmsnorm_f32(&x[0], &w[0], x.shape[0], eps, &y[0])


def silu_mul(g32, u32, out):
    """g, u (n,) f32 -> out (n,) f32: g / (1 + exp(-g)) * u (reference.silu_mul)."""
    cdef const float[::1] g = g32
    cdef const float[::1] u = u32
    cdef float[::1] y = out
    if u.shape[0] != g.shape[0] or y.shape[0] != g.shape[0] or g.shape[0] == 0:
        raise ShapeError(f"silu_mul: g {g.shape[0]}, u {u.shape[0]}, out {y.shape[0]}: one length > 0")
    with nogil:
        pe_silu_mul_f32(&g[0], &u[0], g.shape[0], &y[0])


def rope(x32, cos32, sin32):
    """x (heads, hd) f32 rotated in place at one position; cos, sin (hd/2,) f32 (reference.rope)."""
    cdef float[:, ::1] x = x32
    cdef const float[::1] c = cos32
    cdef const float[::1] s = sin32
    if x.shape[1] % 2 or c.shape[0] != x.shape[1] // 2 or s.shape[0] != c.shape[0] or c.shape[0] == 0:
        raise ShapeError(f"rope: x (heads, hd) with hd even, cos and sin (hd/2,); got x "
                         f"{tuple(x32.shape)}, cos {c.shape[0]}, sin {s.shape[0]}")
    if x.shape[0] == 0:
        return
    with nogil:
        pe_rope_f32(&x[0, 0], x.shape[0], x.shape[1], &c[0], &s[0])


def attend(q32, k32, v32, int64_t lo, int64_t end, float scale, out):
    """q (n_heads, hd) f32 against the cache k, v (n_kv, cap, hd) f32 at positions [lo, end) ->
    out (n_heads, hd) f32 (reference.attend)."""
    cdef const float[:, ::1] q = q32
    cdef const float[:, :, ::1] k = k32
    cdef const float[:, :, ::1] v = v32
    cdef float[:, ::1] y = out
    cdef pe_status st
    cdef int64_t n_heads = q.shape[0], hd = q.shape[1], n_kv = k.shape[0], cap = k.shape[1]
    if (k.shape[2] != hd or tuple(k32.shape) != tuple(v32.shape) or n_kv == 0 or hd == 0
            or n_heads % n_kv or y.shape[0] != n_heads or y.shape[1] != hd
            or not 0 <= lo < end <= cap):
        raise ShapeError(f"attend: q (n_heads, hd) {tuple(q32.shape)}, k and v (n_kv, cap, hd) "
                         f"{tuple(k32.shape)} {tuple(v32.shape)}, out {tuple(out.shape)}, "
                         f"positions [{lo}, {end}): n_heads a multiple of n_kv, 0 <= lo < end <= cap")
    with nogil:
        st = pe_attend_f32(&q[0, 0], &k[0, 0, 0], &v[0, 0, 0], n_heads, n_kv, cap, hd, lo, end,
                           scale, &y[0, 0])
    _check(st)


# ---------------------------------------------------------------- the dense 8-bit baseline

cdef extern from "pyeffort.h" nogil:
    pe_status pe_dense_q8(const float *x, const int8_t *q, const uint16_t *scales,
                          int64_t n_tokens, int64_t n_in, int64_t n_out, float *y)


def dense_q8(x32, q8, s16, out):
    """x (n_tokens, n_in) f32 @ the Q8_0 matrix q (n_in, n_out) int8, scales (ceil(n_in / 32),
    n_out) f16 -> out (n_tokens, n_out) f32 (pyeffort.dense.dense_q8)."""
    import numpy as np

    cdef const float[:, ::1] x = x32
    cdef const int8_t[:, ::1] q = q8
    cdef const uint16_t[:, ::1] s = s16.view(np.uint16)
    cdef float[:, ::1] y = out
    cdef pe_status st
    if (x.shape[1] != q.shape[0] or y.shape[0] != x.shape[0] or y.shape[1] != q.shape[1]
            or s.shape[0] != (q.shape[0] + 31) // 32 or s.shape[1] != q.shape[1]):
        raise ShapeError("dense_q8: x (n_tokens, n_in), q (n_in, n_out), scales "
                         "(ceil(n_in / 32), n_out), out (n_tokens, n_out)")
    if x.shape[0] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return
    with nogil:
        st = pe_dense_q8(&x[0, 0], &q[0, 0], &s[0, 0], x.shape[0], q.shape[0], q.shape[1],
                         &y[0, 0])
    _check(st)
