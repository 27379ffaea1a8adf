/* The last two levels of the cutoff search, run by the selector block of a matrix. */
#pragma once
#include "common.cuh"

/* Level 3 by one warp: the candidates of the level-2 bin (prefix: 22 key bits), at most 32 of
 * them, -> the largest key k with aw + (weight of candidates with key >= k) >= budget, which is
 * the level-3 radix pick's answer; *mults = that sum. Block-wide; false (nothing written) if
 * the bin holds more than 32 candidates or none reaches the budget: the radix level runs. */
__device__ __forceinline__ bool pe_finish_warp(const uint32_t *s_cand, uint32_t cnt,
                                               uint32_t prefix, uint32_t G, double budget,
                                               unsigned long long aw, uint32_t *cut,
                                               unsigned long long *mults) {
    __shared__ uint32_t s_n, s_k[32], s_w[32], s_cut;
    __shared__ unsigned long long s_m;
    __shared__ int s_ok;
    if (threadIdx.x == 0) s_n = 0u, s_ok = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < cnt; i += PE_THREADS) {
        const uint32_t e = s_cand[i], key = e & 0x7FFFFFFFu;
        if ((key & 0xFFFFFE00u) != prefix) continue;
        const uint32_t o = atomicAdd(&s_n, 1u); /* any order: the answer is order-free */
        if (o < 32) s_k[o] = key, s_w[o] = G - (e >> 31);
    }
    __syncthreads();
    const uint32_t n = s_n;
    if (n <= 32 && threadIdx.x < 32) {
        const uint32_t l = threadIdx.x;
        const uint32_t k = l < n ? s_k[l] : 0u;
        unsigned long long s = aw;
        for (uint32_t j = 0; j < n; j++)
            if (s_k[j] >= k) s += s_w[j];
        const bool ok = l < n && (double)s >= budget;
        const uint32_t best = __reduce_max_sync(0xFFFFFFFFu, ok ? k : 0u);
        const unsigned wm = __ballot_sync(0xFFFFFFFFu, ok && k == best); /* ties: one writes */
        if (wm && l == (uint32_t)(__ffs(wm) - 1)) {
            s_cut = best;
            s_m = s;
            s_ok = 1;
        }
    }
    __syncthreads();
    const bool done = s_ok != 0;
    if (done) *cut = s_cut, *mults = s_m;
    __syncthreads();
    return done;
}

/* Levels 2 and 3 over the n_c candidates (key | short << 31, all in level-1 bin b1, weight aw
 * strictly above it; fetch(i) points at the i-th's tagged word, polled until it has `tag`).
 * s_cand: cap words of shared memory, h: PE_NB2 words. Block-wide. -> the cutoff; *mults = the
 * weight of the rows with key >= cutoff. */
template <typename F>
__device__ __forceinline__ uint32_t pe_resolve(const pe_cuda_matrix &m, double budget,
                                               uint32_t n_c, uint32_t b1, unsigned long long aw,
                                               uint32_t *s_cand, uint32_t cap, uint32_t *h,
                                               unsigned long long *mults, F fetch, uint32_t tag) {
    const uint32_t G = (uint32_t)((m.n_out + 15) / 16);
    uint32_t prefix = b1 << 19, b = 0;
    for (int level = 0; level < 2; level++) {
        const int shift = level == 0 ? 9 : 0, nb = level == 0 ? PE_NB2 : PE_NB3;
        const uint32_t hi_mask = level == 0 ? 0xFFF80000u : 0xFFFFFE00u;
        if (level == 1 && n_c <= cap) {
            uint32_t cut;
            if (pe_finish_warp(s_cand, n_c, prefix, G, budget, aw, &cut, mults)) return cut;
        }
        for (int i = threadIdx.x; i < PE_NB2; i += PE_THREADS) h[i] = 0;
        for (uint32_t base = 0; base < n_c; base += cap) {
            const uint32_t cnt = min(n_c - base, cap);
            __syncthreads();
            if (level == 0 || n_c > cap) { /* 8 loads in flight per thread */
                for (uint32_t i0 = 0; i0 < cnt; i0 += 8 * PE_THREADS) {
                    unsigned long long v[8];
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        const uint32_t i = i0 + q * PE_THREADS + threadIdx.x;
                        v[q] = i < cnt ? pe_ld_relaxed64(fetch(base + i)) : 0ull;
                    }
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        const uint32_t i = i0 + q * PE_THREADS + threadIdx.x;
                        if (i < cnt)
                            s_cand[i] = (uint32_t)(v[q] >> 32) == tag
                                            ? (uint32_t)v[q]
                                            : pe_poll_tag<false>(fetch(base + i), tag);
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
