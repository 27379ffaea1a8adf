/* Shared device helpers: dtype conversion, PDL hooks, block meetings, weighted bin search. */
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "pe_cuda.h"

#define PE_NB1 4096 /* level-1 bins: key bits 30..19 (the sign bit is always 0) */
#define PE_NB2 1024 /* level-2 bins: key bits 18..9 */
#define PE_NB3 512  /* level-3 bins: key bits 8..0  */
#define PE_THREADS 512
#define PE_WARPS (PE_THREADS / 32)

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

/* Block meetings through a counter in global memory (all blocks are resident: cooperative
 * launch). pe_signal: every thread's earlier writes, then +1. pe_wait_geq: until >= target, mod
 * 2^32 (a wait of seconds traps: a kernel error instead of a hang, should blocks ever not be
 * resident). */
__device__ __forceinline__ void pe_signal(uint32_t *counter) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
    }
}
/* The PTX of the kernels, each in one small function: the CPU simulator (tests/cuda_shim,
 * PE_CUDA_SIM) gives them in C++ (its include/pe_sim_ptx.h, not shipped with these sources). */
#ifdef PE_CUDA_SIM
#include <pe_sim_ptx.h>
#else
__device__ __forceinline__ uint32_t pe_ld_acquire(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
/* Tagged words: (tag << 32) | value in one 64-bit word, so that a reader needs no separate
 * flag: it polls the word itself until the tag is this call's (pe_poll_tag). */
__device__ __forceinline__ unsigned long long pe_ld_relaxed64(const unsigned long long *p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long pe_ld_acquire64(const unsigned long long *p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void pe_st_relaxed64(unsigned long long *p, unsigned long long v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void pe_st_release64(unsigned long long *p, unsigned long long v) {
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
/* Loads of streamed rows without an L1 allocation (rows.cuh's pe_ld_row*). */
__device__ __forceinline__ uint2 pe_ld_na_v2(const uint8_t *a) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(a));
    return v;
}
__device__ __forceinline__ uint32_t pe_ld_na_u32(const uint8_t *a) {
    uint32_t v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(a));
    return v;
}
__device__ __forceinline__ uint32_t pe_ld_na_u16(const uint8_t *a) {
    unsigned short v;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(a));
    return v;
}
/* Thread block clusters (cluster.cu): this block's rank in its cluster; the cluster barrier in
 * two halves (arrive: release, or relaxed for no ordering; wait: acquire), each executed by every
 * thread of every block of the cluster, arrive then wait, alternately; p (this block's shared
 * memory) -> the same place in the shared memory of the cluster's block `rank` (a generic
 * pointer, read and added to by the pe_dsm_* below only). */
__device__ __forceinline__ uint32_t pe_cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void pe_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void pe_cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void pe_cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
template <typename T>
__device__ __forceinline__ T *pe_cluster_map(T *p, uint32_t rank) {
    unsigned long long r;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return reinterpret_cast<T *>(r);
}
/* Distributed shared memory (pointers from pe_cluster_map): a load, a float load, an add. */
__device__ __forceinline__ uint32_t pe_dsm_ld(const uint32_t *p) { return *(const volatile uint32_t *)p; }
__device__ __forceinline__ float pe_dsm_ldf(const float *p) { return *(const volatile float *)p; }
__device__ __forceinline__ void pe_dsm_add(uint32_t *p, uint32_t v) { atomicAdd(p, v); }
/* Pointers made opaque to the compiler (rows.cuh's pe_row_bases). */
__device__ __forceinline__ void pe_opaque(const uint8_t *&a, const uint8_t *&b) {
    asm("" : "+l"(a), "+l"(b));
}
__device__ __forceinline__ void pe_opaque(const uint8_t *&a, const uint8_t *&b, const uint8_t *&c) {
    asm("" : "+l"(a), "+l"(b), "+l"(c));
}
#endif
__device__ __forceinline__ unsigned long long pe_tagged(uint32_t tag, uint32_t v) {
    return ((unsigned long long)tag << 32) | v;
}
/* The value of *p once its tag is `tag` (acquire: with what the writer released before it).
 * SLEEP_NS > 0: a pause between polls (many threads polling at once load L2 for the blocks
 * still streaming). A wait of seconds traps, as pe_wait_geq. */
template <bool ACQUIRE, unsigned SLEEP_NS = 0>
__device__ __forceinline__ uint32_t pe_poll_tag(const unsigned long long *p, uint32_t tag) {
    uint32_t spins = 0;
    for (;;) {
        const unsigned long long v = ACQUIRE ? pe_ld_acquire64(p) : pe_ld_relaxed64(p);
        if ((uint32_t)(v >> 32) == tag) return (uint32_t)v;
        if (++spins == (1u << 25)) __trap();
        if (SLEEP_NS) __nanosleep(SLEEP_NS);
    }
}

__device__ __forceinline__ void pe_wait_geq(const uint32_t *counter, uint32_t target) {
    if (threadIdx.x == 0) { /* counters only grow, mod 2^32: a wrap-safe comparison */
        uint32_t spins = 0;
        while ((int32_t)(pe_ld_acquire(counter) - target) < 0)
            if (++spins == (1u << 25)) __trap(); /* seconds: a block never came; fail, not hang */
    }
    __syncthreads();
}

/* Row r (rank r / n_in) is short (G - 1 real multiplications) from rank tail = n_out % 16 on,
 * that is from row tail * n_in (none when tail == 0; rows are < 2^31): a compare instead of a
 * 64-bit division per row (once-per-call code: its size costs, README_cuda.md update (5)). */
__device__ __forceinline__ uint32_t pe_short_from(int64_t n_in, int64_t n_out) {
    const int64_t tail = n_out % 16;
    return tail == 0 ? 0xFFFFFFFFu : (uint32_t)min(tail * n_in, (int64_t)0xFFFFFFFF);
}
__device__ __forceinline__ uint32_t pe_is_short(int r, uint32_t short_from) {
    return (uint32_t)r >= short_from ? 1u : 0u;
}

/* The highest bin b (of nb weights w in shared memory) where above + (weight of bins >= b) first
 * reaches budget; as reference.cutoff's searchsorted. Block-wide (PE_THREADS threads); nb is a
 * multiple of PE_THREADS, or fewer (a thread per bin, the rest idle: cluster.cu's slices).
 * -> *bin; *above grown by the bins strictly above it (all threads).
 * One warp-shuffle scan over the threads' bin chunks, highest bins first. */
__device__ __forceinline__ void pe_pick_bin(const uint32_t *w, int nb, double budget,
                                            uint32_t *bin, unsigned long long *above) {
    __shared__ unsigned long long s_ww[PE_WARPS], s_w;
    __shared__ uint32_t s_bin;
    const int per = nb > PE_THREADS ? nb / PE_THREADS : 1, lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int hi = nb - 1 - (int)threadIdx.x * per; /* this thread's bins: hi, hi-1, ... */
    unsigned long long tw = 0;
    for (int q = 0; q < per && hi - q >= 0; q++) tw += w[hi - q];
    unsigned long long iw = tw;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        unsigned long long o = __shfl_up_sync(0xFFFFFFFFu, iw, d);
        if (lane >= d) iw += o;
    }
    if (lane == 31) s_ww[warp] = iw;
    if (threadIdx.x == 0) s_bin = 0, s_w = *above;
    __syncthreads();
    unsigned long long aw = *above + iw - tw;
    for (int k = 0; k < warp; k++) aw += s_ww[k];
    if ((double)aw < budget && (double)(aw + tw) >= budget) { /* the crossing is in my bins */
        for (int q = 0; q < per; q++) {
            if ((double)(aw + w[hi - q]) >= budget) {
                s_bin = (uint32_t)(hi - q);
                s_w = aw;
                break;
            }
            aw += w[hi - q];
        }
    }
    __syncthreads();
    *bin = s_bin;
    *above = s_w;
    __syncthreads();
}
