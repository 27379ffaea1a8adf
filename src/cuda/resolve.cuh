/* The last two levels of the cutoff search, run by the selector block of a matrix. */
#pragma once
#include "common.cuh"

/* Levels 2 and 3 over the n_c candidates (key | short << 31, all in level-1 bin b1, weight aw
 * strictly above it; fetch(i) reads the i-th). s_cand: cap words of shared memory, h: PE_NB2
 * words. Block-wide. -> the cutoff; *mults = the weight of the rows with key >= cutoff. */
template <typename F>
__device__ __forceinline__ uint32_t pe_resolve(const pe_cuda_matrix &m, double budget,
                                               uint32_t n_c, uint32_t b1, unsigned long long aw,
                                               uint32_t *s_cand, uint32_t cap, uint32_t *h,
                                               unsigned long long *mults, F fetch) {
    const uint32_t G = (uint32_t)((m.n_out + 15) / 16);
    uint32_t prefix = b1 << 19, b = 0;
    for (int level = 0; level < 2; level++) {
        const int shift = level == 0 ? 9 : 0, nb = level == 0 ? PE_NB2 : PE_NB3;
        const uint32_t hi_mask = level == 0 ? 0xFFF80000u : 0xFFFFFE00u;
        for (int i = threadIdx.x; i < PE_NB2; i += PE_THREADS) h[i] = 0;
        for (uint32_t base = 0; base < n_c; base += cap) {
            const uint32_t cnt = min(n_c - base, cap);
            __syncthreads();
            if (level == 0 || n_c > cap) { /* 8 loads in flight per thread */
                for (uint32_t i0 = 0; i0 < cnt; i0 += 8 * PE_THREADS) {
                    uint32_t v[8];
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        const uint32_t i = i0 + q * PE_THREADS + threadIdx.x;
                        v[q] = i < cnt ? fetch(base + i) : 0u;
                    }
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        const uint32_t i = i0 + q * PE_THREADS + threadIdx.x;
                        if (i < cnt) s_cand[i] = v[q];
                    }
                }
            }
            __syncthreads();
            for (uint32_t i = threadIdx.x; i < cnt; i += PE_THREADS) {
                const uint32_t e = s_cand[i], key = e & 0x7FFFFFFFu;
                if ((key & hi_mask) != prefix) continue;
                atomicAdd(&h[(key >> shift) & (uint32_t)(nb - 1)], G - (e >> 31));
            }
        }
        __syncthreads();
        pe_pick_bin(h, nb, budget, &b, &aw);
        prefix |= b << shift;
    }
    *mults = aw + h[b];
    __syncthreads();
    return prefix;
}
