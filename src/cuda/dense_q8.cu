/* The dense 8-bit weight-only GEMV (pyeffort.dense's Q8_0): the baseline an effort matmul is
 * judged against at equal weight precision (1.0625 bytes per weight).
 * Block (tile, split): 256 columns (8 per lane of a warp, one 8-byte load per row) over the scale
 * blocks (32 inputs) of its split, warp w taking every 8th of them; per scale block the int8
 * products are summed in float32 and then multiplied by the block's scale. Warps are added in
 * order, splits in order (splitk.cuh): the same bits every call. */
#include "splitk.cuh"

#define PE_Q8_COLS 256 /* columns per block: 8 per lane of a warp */

/* 8 int8 weights of row i from column c (VEC: one aligned 8-byte load, n_out % 8 == 0; else
 * byte by byte, zero past n_out) -> w[0..7] as floats. */
template <bool VEC>
__device__ __forceinline__ void pe_q8_load8(const int8_t *q, int64_t i, int64_t c, int64_t n_out,
                                            float (&w)[8]) {
    if (VEC) {
        const uint2 v = __ldg(reinterpret_cast<const uint2 *>(q + i * n_out + c));
#pragma unroll
        for (int e = 0; e < 4; e++) {
            w[e] = (float)(int8_t)(v.x >> (8 * e));
            w[4 + e] = (float)(int8_t)(v.y >> (8 * e));
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) w[e] = c + e < n_out ? (float)__ldg(q + i * n_out + c + e) : 0.f;
    }
}

/* The 8 fp16 scales of scale block b from column c (as pe_q8_load8). */
template <bool VEC>
__device__ __forceinline__ void pe_q8_scales8(const __half *s, int64_t b, int64_t c, int64_t n_out,
                                              float (&sc)[8]) {
    if (VEC) {
        const uint4 v = __ldg(reinterpret_cast<const uint4 *>(s + b * n_out + c));
        const __half2 *h = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 f = __half22float2(h[e]);
            sc[2 * e] = f.x, sc[2 * e + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) sc[e] = c + e < n_out ? __half2float(s[b * n_out + c + e]) : 0.f;
    }
}

/* x (n_in,) @ W -> y (n_out,), W[i, j] = q[i, j] * scales[i / 32, j]: q (n_in, n_out) int8,
 * scales (ceil(n_in / 32), n_out) fp16. Grid (tiles, n_split); split s takes scale blocks
 * s * per .. (s + 1) * per - 1. */
template <typename TX, typename TY, bool VEC>
__global__ void __launch_bounds__(PE_DENSE_THREADS)
    k_dense_q8(const TX *__restrict__ x, const int8_t *__restrict__ q,
               const __half *__restrict__ scales, int64_t n_in, int64_t n_out, int per,
               pe_splitk sk, TY *y) {
    __shared__ float red[PE_DENSE_WARPS][PE_Q8_COLS + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = blockIdx.x, split = blockIdx.y, n_split = gridDim.y;
    const int64_t c0 = (int64_t)tile * PE_Q8_COLS, c = c0 + 8 * lane;
    const int64_t nb = (n_in + 31) / 32, b_end = min(nb, (int64_t)(split + 1) * per);
    pe_pdl_wait();
    pe_pdl_launch();
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c < n_out) {
        for (int64_t b = (int64_t)split * per + warp; b < b_end; b += PE_DENSE_WARPS) {
            const int64_t i0 = 32 * b;
            const int rows = (int)min((int64_t)32, n_in - i0);
            float blk[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
            for (int r = 0; r < rows; r++) {
                float w[8];
                pe_q8_load8<VEC>(q, i0 + r, c, n_out, w);
                const float xv = pe_to_f32(x[i0 + r]);
#pragma unroll
                for (int e = 0; e < 8; e++) blk[e] = __fmaf_rn(xv, w[e], blk[e]);
            }
            float sc[8];
            pe_q8_scales8<VEC>(scales, b, c, n_out, sc);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = __fmaf_rn(blk[e], sc[e], acc[e]);
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) red[warp][8 * lane + e] = acc[e];
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < PE_DENSE_WARPS; w++) s += red[w][threadIdx.x]; /* 256 threads: a column each */
    pe_splitk_store(sk, tile, split, n_split, c0, PE_Q8_COLS, n_out, s, y);
}

template <typename TX, typename TY>
static cudaError_t dense_q8_typed(const void *x, const int8_t *q, const __half *scales,
                                  int64_t n_in, int64_t n_out, int n_split, pe_splitk sk, void *y,
                                  void *stream, int pdl) {
    const int64_t nb = (n_in + 31) / 32;
    const int per = (int)((nb + n_split - 1) / n_split);
    const dim3 grid((unsigned)((n_out + PE_Q8_COLS - 1) / PE_Q8_COLS), (unsigned)n_split);
    if (n_out % 8 == 0)
        return pe_launch_dense(k_dense_q8<TX, TY, true>, grid, stream, pdl, (const TX *)x, q,
                               scales, n_in, n_out, per, sk, (TY *)y);
    return pe_launch_dense(k_dense_q8<TX, TY, false>, grid, stream, pdl, (const TX *)x, q, scales,
                           n_in, n_out, per, sk, (TY *)y);
}

extern "C" int pe_cuda_dense_q8(const void *x, int x_dtype, int64_t n_tokens, const int8_t *q,
                                const uint16_t *scales, int64_t n_in, int64_t n_out, int n_split,
                                float *partial, uint32_t *count, void *y, int y_dtype,
                                void *stream, int pdl) {
    if (n_tokens < 0 || n_in < 1 || n_out < 1 || n_split < 1 || !q || !scales || !y ||
        (n_split > 1 && (!partial || !count)))
        return PE_CUDA_ERR_ARG;
    const pe_splitk sk = {partial, count};
    const __half *s = (const __half *)scales;
    const int xs = x_dtype == PE_F32 ? 4 : 2, ys = y_dtype == PE_F32 ? 4 : 2;
    for (int64_t t = 0; t < n_tokens; t++) {
        const char *xt = (const char *)x + t * n_in * xs;
        char *yt = (char *)y + t * n_out * ys;
        cudaError_t e = cudaErrorInvalidValue;
        if (x_dtype == PE_F16 && y_dtype == PE_F32)
            e = dense_q8_typed<__half, float>(xt, q, s, n_in, n_out, n_split, sk, yt, stream, pdl);
        else if (x_dtype == PE_F16 && y_dtype == PE_F16)
            e = dense_q8_typed<__half, __half>(xt, q, s, n_in, n_out, n_split, sk, yt, stream, pdl);
        else if (x_dtype == PE_F32 && y_dtype == PE_F32)
            e = dense_q8_typed<float, float>(xt, q, s, n_in, n_out, n_split, sk, yt, stream, pdl);
        else if (x_dtype == PE_BF16 && y_dtype == PE_F32)
            e = dense_q8_typed<__nv_bfloat16, float>(xt, q, s, n_in, n_out, n_split, sk, yt, stream,
                                                     pdl);
        else if (x_dtype == PE_BF16 && y_dtype == PE_BF16)
            e = dense_q8_typed<__nv_bfloat16, __nv_bfloat16>(xt, q, s, n_in, n_out, n_split, sk, yt,
                                                             stream, pdl);
        else
            return PE_CUDA_ERR_ARG;
        if (e != cudaSuccess) return e == cudaErrorInvalidValue ? PE_CUDA_ERR_ARG : PE_CUDA_ERR_DEVICE + (int)e;
    }
    return PE_CUDA_OK;
}
