/* The last two levels of the cutoff search, run by every block of the matmul kernel. */
#pragma once
#include "common.cuh"

#define PE_CAND_SMEM 8192 /* candidates held in shared memory at a time */

/* Levels 2 and 3 over the n_c candidates (block-wide; every block gets the same answer), below
 * level-1 bin b1 with weight aw / count an strictly above it. s_cand: PE_CAND_SMEM words of
 * shared memory. -> the cutoff; *mults, *rows dispatched. */
__device__ __forceinline__ uint32_t pe_resolve(const pe_cuda_matrix &m, double budget,
                                               uint32_t n_c, uint32_t b1, uint64_t aw,
                                               uint32_t an, uint32_t *s_cand,
                                               unsigned long long *mults, uint32_t *rows) {
    __shared__ uint32_t h_n[PE_NB2], h_s[PE_NB2];
    const uint64_t G = (uint64_t)((m.n_out + 15) / 16);
    uint32_t prefix = b1 << 19, b = 0;
    for (int level = 0; level < 2; level++) {
        const int shift = level == 0 ? 9 : 0, nb = level == 0 ? PE_NB2 : PE_NB3;
        const uint32_t hi_mask = level == 0 ? 0xFFF80000u : 0xFFFFFE00u;
        for (int i = threadIdx.x; i < PE_NB2; i += blockDim.x) h_n[i] = h_s[i] = 0;
        for (uint32_t base = 0; base < n_c; base += PE_CAND_SMEM) {
            const uint32_t cnt = min(n_c - base, (uint32_t)PE_CAND_SMEM);
            if (level == 0 || n_c > PE_CAND_SMEM) { /* all loads in flight at once */
                constexpr int PER = PE_CAND_SMEM / PE_SEL_THREADS;
                uint32_t v[PER];
#pragma unroll
                for (int q = 0; q < PER; q++) {
                    const uint32_t i = q * PE_SEL_THREADS + threadIdx.x;
                    v[q] = i < cnt ? __ldcg(&m.cand[base + i]) : 0u;
                }
                __syncthreads();
#pragma unroll
                for (int q = 0; q < PER; q++) {
                    const uint32_t i = q * PE_SEL_THREADS + threadIdx.x;
                    if (i < cnt) s_cand[i] = v[q];
                }
            }
            __syncthreads();
            if (level == 0) PE_STAMP0(m, 17); /* candidates loaded */
            for (uint32_t i = threadIdx.x; i < cnt; i += blockDim.x) {
                uint32_t e = s_cand[i], key = e & 0x7FFFFFFFu;
                if ((key & hi_mask) != prefix) continue;
                uint32_t bin = (key >> shift) & (uint32_t)(nb - 1);
                atomicAdd(&h_n[bin], 1u);
                if (e >> 31) atomicAdd(&h_s[bin], 1u);
            }
        }
        __syncthreads();
        if (level == 0) PE_STAMP0(m, 18); /* level-2 histogram */
        pe_pick_bin(h_n, h_s, nb, G, budget, &b, &aw, &an);
        if (level == 0) PE_STAMP0(m, 19); /* level-2 bin */
        prefix |= b << shift;
    }
    *mults = aw + (uint64_t)h_n[b] * G - h_s[b];
    *rows = an + h_n[b];
    __syncthreads();
    return prefix;
}

