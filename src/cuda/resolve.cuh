/* The last two levels of the cutoff search, run by every block of the matmul kernel. */
#pragma once
#include "common.cuh"

#define PE_CAND_SMEM 8192 /* candidates held in shared memory at a time */
#define PE_SRC_LIST 0     /* candidates: the global list m.cand                  */
#define PE_SRC_SMEM 1     /* candidates: already in s_cand (n_c <= PE_CAND_SMEM) */
#define PE_SRC_KEYS 2     /* candidates: every row's key (n_c = n_rows)          */

/* The level-1 histogram (global) -> h_n, h_s (shared, PE_NB1 each) -> the mode, and for a
 * search the level-1 bin *b1 and the weight *aw / count *an above it. Block-wide. */
__device__ __forceinline__ uint32_t pe_level1(const pe_cuda_matrix &m, double eff, uint32_t *h_n,
                                              uint32_t *h_s, uint32_t *b1, uint64_t *aw,
                                              uint32_t *an) {
    constexpr int NV = 2 * PE_NB1 / 4 / PE_SEL_THREADS;
    const uint4 *src = (const uint4 *)m.hist;
    uint4 v[NV];
#pragma unroll
    for (int q = 0; q < NV; q++) v[q] = __ldcg(src + q * PE_SEL_THREADS + threadIdx.x);
#pragma unroll
    for (int q = 0; q < NV; q++) {
        int i = 4 * (q * PE_SEL_THREADS + threadIdx.x);
        uint32_t *dst = i < PE_NB1 ? h_n + i : h_s + (i - PE_NB1);
        dst[0] = v[q].x, dst[1] = v[q].y, dst[2] = v[q].z, dst[3] = v[q].w;
    }
    __syncthreads();
    const double budget = eff * (double)(m.n_in * m.n_out);
    const uint32_t mode = !(eff > 0.0)                  ? PE_MODE_NONE
                          : (double)m.total_w < budget ? PE_MODE_ALL
                                                       : PE_MODE_SEARCH;
    *b1 = 0, *aw = 0, *an = 0;
    if (mode == PE_MODE_SEARCH)
        pe_pick_bin(h_n, h_s, PE_NB1, (uint64_t)((m.n_out + 15) / 16), budget, b1, aw, an);
    return mode;
}

/* Every row's key -> the rows in level-1 bin b1, appended to s_cand (key | short << 31) in
 * any order (the search below does not depend on it). -> their number (entries past
 * PE_CAND_SMEM are dropped: the caller then searches the keys instead). Block-wide. */
__device__ __forceinline__ uint32_t pe_collect(const pe_cuda_matrix &m, uint32_t b1,
                                               uint32_t *s_cand, uint32_t *s_n) {
    constexpr int U = 16;
    const int lane = threadIdx.x & 31, tail = (int)(m.n_out % 16);
    if (threadIdx.x == 0) *s_n = 0;
    __syncthreads();
    const uint4 *k4 = (const uint4 *)m.keys;
    const int64_t n4 = (m.n_rows + 3) / 4;
    for (int64_t base = 0; base < n4; base += (int64_t)U * PE_SEL_THREADS) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int64_t i = base + u * PE_SEL_THREADS + threadIdx.x;
            v[u] = i < n4 ? __ldg(k4 + i) : make_uint4(~0u, ~0u, ~0u, ~0u);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t r0 = 4 * (base + u * PE_SEL_THREADS + threadIdx.x);
            const uint32_t kk[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const bool hit = r0 + c < m.n_rows && (kk[c] >> 19) == b1;
                const unsigned mask = __ballot_sync(0xFFFFFFFFu, hit);
                if (!mask) continue;
                const int leader = __ffs(mask) - 1;
                uint32_t pos = 0;
                if (lane == leader) pos = atomicAdd(s_n, (uint32_t)__popc(mask));
                pos = __shfl_sync(0xFFFFFFFFu, pos, leader) + __popc(mask & ((1u << lane) - 1));
                if (hit && pos < PE_CAND_SMEM)
                    s_cand[pos] = kk[c] | (pe_is_short(r0 + c, m.n_in, tail) << 31);
            }
        }
    }
    __syncthreads();
    const uint32_t n = *s_n;
    __syncthreads();
    return n;
}

/* Levels 2 and 3 over the n_c candidates (block-wide; every block gets the same answer), below
 * level-1 bin b1 with weight aw / count an strictly above it. s_cand: PE_CAND_SMEM words of
 * shared memory. -> the cutoff; *mults, *rows dispatched. */
__device__ __forceinline__ uint32_t pe_resolve(const pe_cuda_matrix &m, double budget,
                                               uint32_t n_c, uint32_t b1, uint64_t aw,
                                               uint32_t an, uint32_t *s_cand, int src,
                                               unsigned long long *mults, uint32_t *rows) {
    const int tail = (int)(m.n_out % 16);
    __shared__ uint32_t h_n[PE_NB2], h_s[PE_NB2];
    const uint64_t G = (uint64_t)((m.n_out + 15) / 16);
    uint32_t prefix = b1 << 19, b = 0;
    for (int level = 0; level < 2; level++) {
        const int shift = level == 0 ? 9 : 0, nb = level == 0 ? PE_NB2 : PE_NB3;
        const uint32_t hi_mask = level == 0 ? 0xFFF80000u : 0xFFFFFE00u;
        for (int i = threadIdx.x; i < PE_NB2; i += blockDim.x) h_n[i] = h_s[i] = 0;
        for (uint32_t base = 0; base < n_c; base += PE_CAND_SMEM) {
            const uint32_t cnt = min(n_c - base, (uint32_t)PE_CAND_SMEM);
            if (src != PE_SRC_SMEM && (level == 0 || n_c > PE_CAND_SMEM)) {
                __syncthreads();
#pragma unroll 8
                for (uint32_t i = threadIdx.x; i < cnt; i += blockDim.x)
                    s_cand[i] = src == PE_SRC_LIST ? __ldcg(&m.cand[base + i])
                                                   : __ldg(&m.keys[base + i]) |
                                                         (pe_is_short(base + i, m.n_in, tail) << 31);
            }
            __syncthreads();
            for (uint32_t i = threadIdx.x; i < cnt; i += blockDim.x) {
                uint32_t e = s_cand[i], key = e & 0x7FFFFFFFu;
                if ((key & hi_mask) != prefix) continue;
                uint32_t bin = (key >> shift) & (uint32_t)(nb - 1);
                atomicAdd(&h_n[bin], 1u);
                if (e >> 31) atomicAdd(&h_s[bin], 1u);
            }
        }
        __syncthreads();
        pe_pick_bin(h_n, h_s, nb, G, budget, &b, &aw, &an);
        prefix |= b << shift;
    }
    *mults = aw + (uint64_t)h_n[b] * G - h_s[b];
    *rows = an + h_n[b];
    __syncthreads();
    return prefix;
}

