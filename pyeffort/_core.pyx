# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled core: thin wrappers over src/cpu. Inputs are validated in pyeffort/_validate.py;
C status codes become exceptions here, in one place (_check)."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t

from pyeffort.errors import BackendError, NonFiniteError, ShapeError

cdef extern from "pyeffort.h" nogil:
    ctypedef enum pe_status:
        PE_OK
        PE_ERR_ALLOC
        PE_ERR_NONFINITE
        PE_ERR_ARG
        PE_ERR_THREAD
    ctypedef struct pe_buckets:
        const uint16_t *values
        const uint8_t *positions
        const float *stats
        const int32_t *order
        int64_t n_in, n_out, n_groups, n_rows
    pe_status pe_build_f16(const uint16_t *w, int64_t n_in, int64_t n_out, uint16_t *values,
                           uint8_t *positions, float *stats, int32_t *order)
    pe_status pe_bucketmul(const pe_buckets *b, const float *x, int64_t n_tokens, double effort,
                           float *y, int64_t *mults, int64_t *bytes)
    pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                           int64_t n_out, float *y)
    const char *pe_kernel_name()
    int pe_num_threads()
    void pe_set_num_threads(int n)

NAME = "c"


cdef int _check(pe_status st) except -1:
    """The one place where C status codes turn into Python exceptions."""
    if st == PE_OK:
        return 0
    if st == PE_ERR_ALLOC:
        raise MemoryError("pyeffort: out of memory in the C core")
    if st == PE_ERR_NONFINITE:
        raise NonFiniteError("x holds NaN or Inf; pyeffort.matmul needs finite inputs")
    if st == PE_ERR_ARG:
        raise ShapeError("inconsistent sizes reached the C core")
    if st == PE_ERR_THREAD:
        raise BackendError("could not start a worker thread")
    raise BackendError(f"unknown status {st} from the C core")


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


def bucketmul(x32, values, positions, stats, order, int64_t n_out, double effort, out):
    """x (n_tokens, n_in) f32 -> out (n_tokens, n_out) f32; returns (mults, bytes)."""
    import numpy as np

    cdef const float[:, ::1] x = x32
    cdef const uint16_t[:, ::1] v = values.view(np.uint16)
    cdef const uint8_t[:, ::1] p = positions
    cdef const float[:, ::1] s = stats
    cdef const int32_t[:, ::1] o = order
    cdef float[:, ::1] y = out
    cdef pe_buckets b
    cdef int64_t mults = 0, nbytes = 0
    cdef pe_status st
    b.values = &v[0, 0] if v.shape[0] else NULL
    b.positions = &p[0, 0] if p.shape[0] else NULL
    b.stats = &s[0, 0]
    b.order = &o[0, 0]
    b.n_in = s.shape[1]
    b.n_out = n_out
    b.n_groups = v.shape[1]
    b.n_rows = v.shape[0]
    with nogil:
        st = pe_bucketmul(&b, &x[0, 0], x.shape[0], effort, &y[0, 0], &mults, &nbytes)
    _check(st)
    return mults, nbytes


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


def kernel_name():
    return pe_kernel_name().decode()


def num_threads():
    return pe_num_threads()


def set_num_threads(int n):
    pe_set_num_threads(n)
