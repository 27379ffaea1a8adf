/* Host-side launch plumbing of the effort kernels (bucketmul.cu, cluster.cu): the kernel of a
 * call's dtypes, tile width and value kind, its attributes raised once, a launch per token. */
#pragma once
#include <type_traits>

#include "common.cuh"

/* A CUDA runtime error -> a status (pe_cuda.h). */
static inline int pe_status_of(cudaError_t e) {
    return e == cudaSuccess ? PE_CUDA_OK : PE_CUDA_ERR_DEVICE + (int)e;
}

template <int V>
using pe_int = std::integral_constant<int, V>;

/* f(TX *, TY *, pe_int<CT>, pe_int<Q8>) for the kernel of activations xd, outputs yd, tile
 * width ct and value kind q8 (the types as null pointers); cudaErrorInvalidValue for one the
 * library has not. */
template <typename F>
static cudaError_t pe_by_kind(int xd, int yd, int ct, int q8, F f) {
    auto by_q8 = [&](auto tx, auto ty, auto c) {
        return q8 ? f(tx, ty, c, pe_int<1>()) : f(tx, ty, c, pe_int<0>());
    };
    auto by_ct = [&](auto tx, auto ty) {
        switch (ct) {
            case 32: return by_q8(tx, ty, pe_int<32>());
            case 64: return by_q8(tx, ty, pe_int<64>());
            case 128: return by_q8(tx, ty, pe_int<128>());
            case 256: return by_q8(tx, ty, pe_int<256>());
            default: return cudaErrorInvalidValue;
        }
    };
    if (xd == PE_F16 && yd == PE_F32) return by_ct((__half *)nullptr, (float *)nullptr);
    if (xd == PE_F16 && yd == PE_F16) return by_ct((__half *)nullptr, (__half *)nullptr);
    if (xd == PE_F32 && yd == PE_F32) return by_ct((float *)nullptr, (float *)nullptr);
    if (xd == PE_BF16 && yd == PE_F32) return by_ct((__nv_bfloat16 *)nullptr, (float *)nullptr);
    if (xd == PE_BF16 && yd == PE_BF16)
        return by_ct((__nv_bfloat16 *)nullptr, (__nv_bfloat16 *)nullptr);
    return cudaErrorInvalidValue;
}

/* f(...) as pe_by_kind for every kernel the library has, until one fails. */
template <typename F>
static cudaError_t pe_for_each_kind(F f) {
    static const int pairs[][2] = {{PE_F16, PE_F32}, {PE_F16, PE_F16}, {PE_F32, PE_F32},
                                   {PE_BF16, PE_F32}, {PE_BF16, PE_BF16}};
    cudaError_t e = cudaSuccess;
    for (const auto &p : pairs)
        for (int ct = 32; ct <= 256 && e == cudaSuccess; ct *= 2)
            for (int q8 = 0; q8 < 2 && e == cudaSuccess; q8++) e = pe_by_kind(p[0], p[1], ct, q8, f);
    return e;
}

/* launch(g, x) for each of the n_tokens rows of x: x and every output advanced by a row. -> a
 * status (cudaErrorInvalidValue: a dtype or ct unknown here, PE_CUDA_ERR_ARG). */
template <typename L>
static int pe_per_token(const pe_cuda_group *g, const void *x, int x_dtype, int y_dtype,
                        int64_t n_tokens, L launch) {
    const int xs = x_dtype == PE_F32 ? 4 : 2, ys = y_dtype == PE_F32 ? 4 : 2;
    pe_cuda_group gt = *g;
    for (int64_t t = 0; t < n_tokens; t++) {
        const char *xt = (const char *)x + t * g->m[0].n_in * xs;
        for (int i = 0; i < g->n_mat; i++) gt.y[i] = (char *)g->y[i] + t * g->m[i].n_out * ys;
        const cudaError_t e = launch(&gt, (const void *)xt);
        if (e == cudaErrorInvalidValue) return PE_CUDA_ERR_ARG;
        if (e != cudaSuccess) return pe_status_of(e);
    }
    return PE_CUDA_OK;
}

/* The types of pe_by_kind's arguments. */
template <typename P>
using pe_type_of = std::remove_pointer_t<P>;

/* g's matrices as the kernels take them (pe_cuda.h): 1 to PE_MAX_GROUP, one ct, n_in and value
 * kind, their tiles covering n_out, outputs and state given, each matrix's blocks after the
 * last's; with C > 0 every matrix has C splits. */
static inline bool pe_group_ok(const pe_cuda_group *g, int32_t C) {
    if (!g || g->n_mat < 1 || g->n_mat > PE_MAX_GROUP) return false;
    int32_t next = 0;
    for (int i = 0; i < g->n_mat; i++) {
        const pe_cuda_matrix *m = &g->m[i];
        if (m->n_rows < 1 || m->n_rows > 16 * m->n_in || m->n_splits < 1 || m->n_tiles < 1 ||
            (C > 0 && m->n_splits != C) || m->ct != g->m[0].ct || m->n_in != g->m[0].n_in ||
            m->block0 != next || (int64_t)m->n_tiles * 16 * m->ct < m->n_out || !g->y[i] ||
            !m->state || m->q8 != g->m[0].q8 || (m->q8 != 0 && (m->q8 != 1 || !m->slot)))
            return false;
        next += m->n_tiles * m->n_splits;
    }
    return next == g->n_workers;
}
