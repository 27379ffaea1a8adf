/* Split-K sums of the dense kernels (dense_q8.cu, channel_skip.cu). Block (tile, split) of a
 * grid holds the partial sums of its column tile over its share of the inputs; the last block of
 * a tile to arrive (a counter per tile, the threadfence-reduction pattern) adds the n_split
 * partials in split order -> y and resets the counter for the next call. Fixed order: the same
 * bits every call. */
#pragma once
#include "common.cuh"

#define PE_DENSE_THREADS 256
#define PE_DENSE_WARPS (PE_DENSE_THREADS / 32)

/* Scratch of a dense matrix on the device (zeroed once; reused by every call). */
typedef struct {
    float *partial;  /* (n_split, n_out) partial sums of the splits          */
    uint32_t *count; /* (n_tiles,) blocks of a tile arrived, back to 0 after */
} pe_splitk;

/* s (this block's sums of columns c0 .. c0 + ncols - 1, one per thread < ncols) -> y, through
 * the partials when n_split > 1. Block-wide. */
template <typename TY>
__device__ __forceinline__ void pe_splitk_store(pe_splitk sk, int tile, int split, int n_split,
                                                int64_t c0, int ncols, int64_t n_out, float s,
                                                TY *y) {
    __shared__ int s_last;
    const int64_t c = c0 + threadIdx.x;
    const bool mine = (int)threadIdx.x < ncols && c < n_out;
    if (n_split == 1) {
        if (mine) pe_store(&y[c], s);
        return;
    }
    if (mine) sk.partial[(int64_t)split * n_out + c] = s;
    __threadfence(); /* the partial before the count */
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(&sk.count[tile], 1u) == (uint32_t)(n_split - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence(); /* the others' partials after their counts */
    if (mine) {
        float t = 0.f;
        for (int sp = 0; sp < n_split; sp++) t += __ldcg(&sk.partial[(int64_t)sp * n_out + c]);
        pe_store(&y[c], t);
    }
    if (threadIdx.x == 0) sk.count[tile] = 0u; /* the next call (a later kernel) starts at 0 */
}

/* Launch with the stream's PDL / plain attributes: grid x block threads, no dynamic smem. */
template <typename K, typename... A>
static cudaError_t pe_launch_dense(K kernel, dim3 grid, void *stream, int pdl, A... args) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = dim3(PE_DENSE_THREADS);
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}
