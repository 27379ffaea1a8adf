/* Shared device helpers: dtype conversion, PDL hooks, row weights, block bin search. */
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "pe_cuda.h"

#define PE_NB1 4096 /* level-1 bins: key bits 30..19 (the sign bit is always 0) */
#define PE_NB2 1024 /* level-2 bins: key bits 18..9 */
#define PE_NB3 512  /* level-3 bins: key bits 8..0  */
#define PE_SEL_THREADS 512
#define PE_MODE_SEARCH 0u
#define PE_MODE_NONE 1u
#define PE_MODE_ALL 2u

__device__ __forceinline__ float pe_to_f32(float v) { return v; }
__device__ __forceinline__ float pe_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float pe_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void pe_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void pe_store(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void pe_store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* Programmatic dependent launch: wait for the previous grid's results / let the next one start. */
__device__ __forceinline__ void pe_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pe_pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Profiling (m.timing set): the global nanosecond timer, comparable across multiprocessors. */
__device__ __forceinline__ long long pe_now() {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define PE_STAMP0(m, i) \
    if ((m).timing && blockIdx.x == 0 && threadIdx.x == 0) (m).timing[i] = pe_now()
#define PE_STAMP_MAX(m, i) \
    if ((m).timing && threadIdx.x == 0) \
    atomicMax((unsigned long long *)&(m).timing[i], (unsigned long long)pe_now())

/* Row r of rank r / n_in is short (G - 1 real multiplications) past the last group's size. */
__device__ __forceinline__ uint32_t pe_is_short(int64_t r, int64_t n_in, int tail) {
    return (tail != 0 && r / n_in >= tail) ? 1u : 0u;
}

/* The highest bin b (of nb, counts cnt / short counts shrt in shared memory) where the weight
 * above + (bins >= b) first reaches budget; as reference.cutoff's searchsorted. On return (all
 * threads): *bin, and *above_w / *above_n grown by the bins strictly above it. Block-wide:
 * every thread of a PE_SEL_THREADS block calls it. nb is a multiple of PE_SEL_THREADS.
 * One warp-shuffle scan of (weight, count) over the threads' bin chunks, highest bins first. */
__device__ __forceinline__ void pe_pick_bin(const uint32_t *cnt, const uint32_t *shrt, int nb,
                                            uint64_t G, double budget, uint32_t *bin,
                                            uint64_t *above_w, uint32_t *above_n) {
    constexpr int NW = PE_SEL_THREADS / 32;
    __shared__ unsigned long long s_ww[NW], s_w;
    __shared__ uint32_t s_wn[NW], s_bin, s_n;
    const int per = nb / PE_SEL_THREADS, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hi = nb - 1 - (int)threadIdx.x * per; /* this thread's bins: hi, hi-1, ... */
    unsigned long long tw = 0;
    uint32_t tn = 0;
    for (int q = 0; q < per; q++) {
        tw += (unsigned long long)cnt[hi - q] * G - shrt[hi - q];
        tn += cnt[hi - q];
    }
    unsigned long long iw = tw;
    uint32_t in = tn;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        unsigned long long ow = __shfl_up_sync(0xFFFFFFFFu, iw, d);
        uint32_t on = __shfl_up_sync(0xFFFFFFFFu, in, d);
        if (lane >= d) iw += ow, in += on;
    }
    if (lane == 31) s_ww[warp] = iw, s_wn[warp] = in;
    if (threadIdx.x == 0) s_bin = 0, s_w = *above_w, s_n = *above_n;
    __syncthreads();
    unsigned long long aw = *above_w + iw - tw;
    uint32_t an = *above_n + in - tn;
    for (int w = 0; w < warp; w++) aw += s_ww[w], an += s_wn[w];
    if ((double)aw < budget && (double)(aw + tw) >= budget) { /* the crossing is in my bins */
        for (int q = 0; q < per; q++) {
            unsigned long long w = (unsigned long long)cnt[hi - q] * G - shrt[hi - q];
            if ((double)(aw + w) >= budget) {
                s_bin = (uint32_t)(hi - q);
                s_w = aw;
                s_n = an;
                break;
            }
            aw += w;
            an += cnt[hi - q];
        }
    }
    __syncthreads();
    *bin = s_bin;
    *above_w = s_w;
    *above_n = s_n;
    __syncthreads();
}
