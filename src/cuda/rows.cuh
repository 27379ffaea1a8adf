/* Row machinery of the effort kernel: keys of a split's rows in registers, block compaction of
 * the rows to dispatch into shared-memory lists, and the scatter of list rows into accumulators.
 * Rows of a matrix go to its n_splits splits in 32-row stripes (split s owns stripes s, s + S,
 * ...: every split is a fair sample); a pass holds PE_KR rounds of PE_WARPS stripes of a split,
 * one key per thread and round, in registers.
 * A list entry is (chunk index, x): the row itself for fp16 values, its slot (pe_cuda.h) for
 * int8 values (Q8: the template flag of every function that reads or lists the chunks). */
#pragma once
#include "common.cuh"

#define PE_KR 8 /* rounds per pass: keys held per thread (16: 11-18% slower, less L1 left) */
#define PE_CAND_CAP 1024 /* own candidate rows kept in shared memory */
#define PE_PASS_ROWS (PE_KR * PE_THREADS) /* rows of a split per pass (list capacity) */
#define PE_UNROLL 8 /* rows per load batch of a team (two in flight), for every tile width */
#define PE_INVALID 0xFFFFFFFFu            /* key of a missing row (real keys are < 2^31) */

template <int CT>
struct Tile {
    static constexpr int TPT = CT / 4;             /* threads per team, 4 groups each      */
    static constexpr int NT = PE_THREADS / TPT;    /* teams per block                      */
    static constexpr int ACC = 16 * CT + TPT;      /* floats per team (padded: no conflicts) */
    static constexpr int CB = CT * 5 / 2;          /* bytes of one row's chunk in a tile   */
    static constexpr int QCB = CT * 3 / 2;         /* q8: bytes of a row's chunk in a record */
    static constexpr int QREC = CT / 2 + 4 * QCB;  /* q8: bytes of a record (scales, chunks) */
    static constexpr int ACC_BYTES = 4 * NT * ACC; /* accumulators (selector: scratch)     */
    static constexpr int LIST_BYTES = 8 * PE_PASS_ROWS;  /* (row, x) of dispatched rows   */
    static constexpr int CAND_BYTES = 12 * PE_CAND_CAP;  /* (row, x), key of own candidates */
    static constexpr int SMEM = ACC_BYTES + LIST_BYTES + CAND_BYTES;
    static constexpr int U = PE_UNROLL;
};

/* Where a split's rows are: row of (pass p, round q) for this thread, or -1. */
__device__ __forceinline__ int pe_row_of(const pe_cuda_matrix &m, int split, int p, int q) {
    const int64_t k = ((int64_t)p * PE_KR + q) * PE_WARPS + (threadIdx.x >> 5);
    const int64_t r = (split + k * m.n_splits) * 32 + (threadIdx.x & 31);
    return r < m.n_rows ? (int)r : -1;
}

/* Pass p of a split, first half (constant data only: may run before the PDL wait). ci: the
 * chunk index of each row, loaded for Q8 (fp16 callers pass ri: the row is its chunk). */
template <bool Q8>
__device__ __forceinline__ void pe_load_meta(const pe_cuda_matrix &m, int split, int p,
                                             int (&ri)[PE_KR], int (&o)[PE_KR],
                                             float (&s)[PE_KR], int (&ci)[PE_KR]) {
#pragma unroll
    for (int q = 0; q < PE_KR; q++) {
        ri[q] = pe_row_of(m, split, p, q);
        o[q] = ri[q] >= 0 ? __ldg(m.order + ri[q]) : 0;
        s[q] = ri[q] >= 0 ? __ldg(m.stats + ri[q]) : 0.f;
        if (Q8) ci[q] = ri[q] >= 0 ? __ldg(m.slot + ri[q]) : 0;
    }
}

/* x of each row (0 where there is none). */
template <typename TX>
__device__ __forceinline__ void pe_gather_x(const TX *x, const int (&ri)[PE_KR],
                                            const int (&o)[PE_KR], float (&xv)[PE_KR]) {
#pragma unroll
    for (int q = 0; q < PE_KR; q++) xv[q] = ri[q] >= 0 ? pe_to_f32(x[o[q]]) : 0.f;
}

/* Second half: x of each row and its key s = |x| * stat (float bits, sign cleared). */
template <typename TX>
__device__ __forceinline__ void pe_finish_keys(const TX *x, const int (&ri)[PE_KR],
                                               const int (&o)[PE_KR], const float (&s)[PE_KR],
                                               float (&xv)[PE_KR], uint32_t (&key)[PE_KR]) {
    pe_gather_x(x, ri, o, xv);
#pragma unroll
    for (int q = 0; q < PE_KR; q++)
        key[q] = ri[q] >= 0 ? __float_as_uint(__fmul_rn(fabsf(xv[q]), s[q])) & 0x7FFFFFFFu
                            : PE_INVALID;
}

template <bool Q8, typename TX>
__device__ __forceinline__ void pe_load_keys(const TX *x, const pe_cuda_matrix &m, int split,
                                             int p, int (&ri)[PE_KR], float (&xv)[PE_KR],
                                             uint32_t (&key)[PE_KR], int (&ci)[PE_KR]) {
    int o[PE_KR];
    float s[PE_KR];
    pe_load_meta<Q8>(m, split, p, ri, o, s, ci);
    pe_finish_keys(x, ri, o, s, xv, key);
}

/* Exclusive prefix of the PE_KR * PE_WARPS (round, warp) counts c in place, by one warp;
 * -> the total. */
__device__ __forceinline__ uint32_t pe_warp_scan256(uint32_t *c) {
    constexpr int PER = PE_KR * PE_WARPS / 32;
    const int lane = threadIdx.x & 31;
    uint32_t v[PER], sum = 0;
#pragma unroll
    for (int k = 0; k < PER; k++) sum += (v[k] = c[lane * PER + k]);
    uint32_t incl = sum;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += o;
    }
    uint32_t run = incl - sum;
#pragma unroll
    for (int k = 0; k < PER; k++) {
        c[lane * PER + k] = run;
        run += v[k];
    }
    return __shfl_sync(0xFFFFFFFFu, run, 31);
}

/* Every row of pass p of a split, as pe_compact would list them with every row taken: entry
 * q * PE_THREADS + threadIdx.x (the same (round, warp, lane) order, which is row order) gets
 * the row's chunk ci (list[].x; x, list[].y, is the caller's). The rows that exist (ri >= 0) are a prefix
 * of the entries, since every stripe of the split is whole but the matrix's last, which ends
 * at n_rows. No barrier; -> their number (all threads). n_k: stripes of the split. */
__device__ __forceinline__ uint32_t pe_list_rows(int p, uint32_t n_k, int split, int n_splits,
                                                 uint32_t n_stripes, uint32_t n_rows,
                                                 const int (&ri)[PE_KR],
                                                 const int (&ci)[PE_KR], int2 *list) {
#pragma unroll
    for (int q = 0; q < PE_KR; q++)
        if (ri[q] >= 0) list[q * PE_THREADS + threadIdx.x].x = ci[q];
    const uint32_t k0 = (uint32_t)p * (PE_KR * PE_WARPS), kend = min(n_k, k0 + PE_KR * PE_WARPS);
    uint32_t n = 32u * (kend - k0);
    const uint32_t rem = n_rows & 31u;
    if (rem && kend == n_k && (uint32_t)split + (n_k - 1u) * (uint32_t)n_splits == n_stripes - 1u)
        n -= 32u - rem;
    return n;
}
/* x of those entries -> list[].y. */
__device__ __forceinline__ void pe_list_x(const int (&ri)[PE_KR], const float (&xv)[PE_KR],
                                          int2 *list) {
#pragma unroll
    for (int q = 0; q < PE_KR; q++)
        if (ri[q] >= 0) list[q * PE_THREADS + threadIdx.x].y = __float_as_int(xv[q]);
}

/* Block compaction: the rows with take[q] -> list[n0 ...] as (chunk ci, x), in (round, warp,
 * lane) order (deterministic). Block-wide; -> the number taken (all threads). */
__device__ __forceinline__ uint32_t pe_compact(const bool (&take)[PE_KR], const int (&ci)[PE_KR],
                                               const float (&xv)[PE_KR], int2 *list, uint32_t n0,
                                               uint32_t *warp_n, uint32_t *s_tot) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned mk[PE_KR];
#pragma unroll
    for (int q = 0; q < PE_KR; q++) {
        mk[q] = __ballot_sync(0xFFFFFFFFu, take[q]);
        if (lane == 0) warp_n[q * PE_WARPS + warp] = __popc(mk[q]);
    }
    __syncthreads();
    if (warp == 0) {
        uint32_t tot = pe_warp_scan256(warp_n);
        if (lane == 0) *s_tot = tot;
    }
    __syncthreads();
    const unsigned lt = (1u << lane) - 1u;
#pragma unroll
    for (int q = 0; q < PE_KR; q++)
        if (mk[q] >> lane & 1u)
            list[n0 + warp_n[q * PE_WARPS + warp] + __popc(mk[q] & lt)] =
                make_int2(ci[q], __float_as_int(xv[q]));
    const uint32_t n = *s_tot;
    __syncthreads();
    return n;
}

/* Words per worker in m.cand: a tagged count, then up to cand_seg tagged keys (64 bits each). */
__device__ __forceinline__ size_t pe_cand_stride(const pe_cuda_matrix &m) {
    return (size_t)(2 * m.cand_seg + 2);
}

/* One pass of a worker's keys against level-1 bin b1: rows above it (sure) -> list as (chunk
 * ci, x) (from list_base, if they all fit; the caller checks list_base + result <= PE_PASS_ROWS);
 * rows in it (candidates) -> own list cand_rx/cand_k from *n_c (as far as it holds), and the
 * worker's share (candidate index % n_tiles == tile) -> its segment of m.cand. Block-wide;
 * -> the number of sure rows; *n_c grows by the candidates. With publish and last, the
 * worker's tagged count goes out before its keys (tagged too: the selector polls each). */
__device__ __forceinline__ uint32_t split_rows(const pe_cuda_matrix &m, int b1, bool do_def,
                                               bool do_cand, bool publish, int tile, int worker,
                                               const int (&ri)[PE_KR],
                                               const int (&ci)[PE_KR],
                                               const float (&xv)[PE_KR],
                                               const uint32_t (&key)[PE_KR], int2 *list,
                                               uint32_t list_base, int2 *cand_rx,
                                               uint32_t *cand_k, uint32_t *n_c,
                                               uint32_t (*warp_n)[PE_KR * PE_WARPS],
                                               uint32_t *s_tot, uint32_t tag, bool last,
                                               uint32_t short_from) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t nt = (uint32_t)m.n_tiles, c0 = *n_c;
    /* number of candidate indices o < v with o % nt == tile: this worker's share */
    auto share_below = [&](uint32_t v) -> uint32_t {
        return v > (uint32_t)tile ? (v - (uint32_t)tile + nt - 1) / nt : 0u;
    };
    unsigned dm[PE_KR], cm[PE_KR];
#pragma unroll
    for (int q = 0; q < PE_KR; q++) {
        const bool ok = ri[q] >= 0;
        const int bin = (int)(key[q] >> 19);
        dm[q] = __ballot_sync(0xFFFFFFFFu, do_def && ok && bin > b1);
        cm[q] = __ballot_sync(0xFFFFFFFFu, do_cand && ok && bin == b1);
        if (lane == 0) {
            warp_n[0][q * PE_WARPS + warp] = __popc(dm[q]);
            warp_n[1][q * PE_WARPS + warp] = __popc(cm[q]);
        }
    }
    __syncthreads();
    if (warp < 2) {
        const uint32_t tot = pe_warp_scan256(warp_n[warp]);
        if (lane == 0) s_tot[warp] = tot;
    }
    __syncthreads();
    const uint32_t nd = s_tot[0], nc = s_tot[1];
    const unsigned lt = (1u << lane) - 1u;
    /* sure rows go to list[list_base ...] only if all fit (list_base 0: always) */
    const bool wd = list_base == 0 || list_base + nd <= PE_PASS_ROWS;
    /* the count goes out at once (the last pass): each key carries the tag, so no fence */
    if (publish && last && threadIdx.x == 0)
        pe_st_relaxed64((unsigned long long *)(m.cand + (size_t)worker * pe_cand_stride(m)),
                        pe_tagged(tag, share_below(c0 + nc)));
#pragma unroll
    for (int q = 0; q < PE_KR; q++) {
        if (wd && (dm[q] >> lane & 1u))
            list[list_base + warp_n[0][q * PE_WARPS + warp] + __popc(dm[q] & lt)] =
                make_int2(ci[q], __float_as_int(xv[q]));
        if (cm[q] >> lane & 1u) {
            const uint32_t o = c0 + warp_n[1][q * PE_WARPS + warp] + __popc(cm[q] & lt);
            if (o < PE_CAND_CAP) {
                cand_rx[o] = make_int2(ci[q], __float_as_int(xv[q]));
                cand_k[o] = key[q] | (pe_is_short(ri[q], short_from) << 31);
            }
        }
    }
    __syncthreads();
    if (nc && publish) { /* this worker's segment of the global list: 1 + share index */
        unsigned long long *seg =
            (unsigned long long *)(m.cand + (size_t)worker * pe_cand_stride(m)) + 1;
        /* from the own list when it holds them all: a short loop instead of 8 unrolled rounds
         * with two divisions each. The same stores; this code runs once per call on the
         * critical path, and its size was what cost (-1.0 to -1.4 us per call, update 4) */
        if (c0 + nc <= PE_CAND_CAP) { /* candidate o = tile + j * nt is the share's j-th */
            uint32_t o;
            for (uint32_t j = share_below(c0) + threadIdx.x; (o = tile + j * nt) < c0 + nc;
                 j += PE_THREADS)
                pe_st_relaxed64(&seg[j], pe_tagged(tag, cand_k[o]));
        } else {
#pragma unroll
            for (int q = 0; q < PE_KR; q++) {
                if (cm[q] >> lane & 1u) {
                    const uint32_t o = c0 + warp_n[1][q * PE_WARPS + warp] + __popc(cm[q] & lt);
                    const uint32_t j = o / nt; /* o % nt == tile: the share's j-th */
                    if (o - j * nt == (uint32_t)tile) {
                        const uint32_t e = key[q] | (pe_is_short(ri[q], short_from) << 31);
                        pe_st_relaxed64(&seg[j], pe_tagged(tag, e));
                    }
                }
            }
        }
    }
    *n_c = c0 + nc;
    return nd;
}

/* Loads of the streamed rows (read once). Chunks of CT >= 64 are whole 32-byte sectors: loaded
 * without an L1 allocation (4096x14336 at 0.5: 43.8 -> 37.0 us against __ldg; the cause is not
 * verified: likely misses waiting for L1 lines, ~60 KB of L1 being left beside the shared
 * memory). Chunks of CT = 32 (80 bytes) share sectors with their neighbours, which other teams
 * load next: through L1 (no_allocate was 1.3 us slower at 4096x1024, effort 1.0). The q8
 * records follow the same rule (CT >= 64: every chunk and scale block is whole sectors). */
template <int CT>
__device__ __forceinline__ uint2 pe_ld_row8(const uint8_t *a) {
    if (CT >= 64) return pe_ld_na_v2(a);
    return __ldg((const uint2 *)a);
}
template <int CT>
__device__ __forceinline__ uint32_t pe_ld_row4(const uint8_t *a) {
    if (CT >= 64) return pe_ld_na_u32(a);
    return __ldg((const unsigned int *)a);
}
template <int CT>
__device__ __forceinline__ uint32_t pe_ld_row2(const uint8_t *a) {
    if (CT >= 64) return pe_ld_na_u16(a);
    return __ldg((const unsigned short *)a);
}

/* Where column tile `tile` of the repack starts (pe_cuda.h): n_rows chunks, or (Q8) n_records
 * records, n_records = reference.scale_rows (rows < 2^31, so n_in < 2^27: 32-bit). */
template <int CT, bool Q8>
__device__ __forceinline__ const uint8_t *pe_tile_base(const pe_cuda_matrix &m, int tile) {
    if (!Q8) return m.wt + (size_t)tile * (size_t)m.n_rows * Tile<CT>::CB;
    const uint32_t n_in = (uint32_t)m.n_in, rows = (uint32_t)m.n_rows;
    const uint32_t tiers = rows / (4u * n_in); /* whole tiers loaded */
    const uint32_t n_rec = min(4u * n_in, tiers * n_in + min(n_in, rows - tiers * 4u * n_in));
    return m.wt + (size_t)tile * n_rec * Tile<CT>::QREC;
}

/* A thread's values of one row: 4 fp16 (uint2), or 4 int8 (uint32_t, Q8). */
template <bool Q8>
struct PeVals {
    typedef uint2 T;
};
template <>
struct PeVals<true> {
    typedef uint32_t T;
};

/* Where this thread's share of a row's chunk is: values at b8 + row * CB (8 bytes), nibbles at
 * b2 + row * CB (2 bytes). The bases are opaque to the compiler, so that each address is one
 * wide multiply-add (it re-associated them into three instructions: 6 instead of 2 per row).
 * Q8: values at b8 + o (4 bytes), nibbles at b2 + o, its scale at bs + record * QREC (2
 * bytes), o = record * QREC + chunk * QCB. */
struct RowBases {
    const uint8_t *b8, *b2, *bs;
};
template <int CT, bool Q8>
__device__ __forceinline__ RowBases pe_row_bases(const uint8_t *tile_base, int t) {
    if (!Q8) {
        RowBases rb{tile_base + 8 * t, tile_base + 2 * CT + 2 * t, nullptr};
        pe_opaque(rb.b8, rb.b2);
        return rb;
    }
    RowBases rb{tile_base + CT / 2 + 4 * t, tile_base + CT / 2 + CT + 2 * t, tile_base + 2 * t};
    pe_opaque(rb.b8, rb.b2, rb.bs);
    return rb;
}
/* The chunk c of a row (list[].x) -> v (values) and p (nibbles; Q8: | the scale's bits << 16). */
template <int CT, bool Q8>
__device__ __forceinline__ void pe_load_row(const RowBases &rb, int c,
                                            typename PeVals<Q8>::T &v, uint32_t &p) {
    if constexpr (!Q8) {
        const size_t o = (size_t)(uint32_t)c * Tile<CT>::CB;
        v = pe_ld_row8<CT>(rb.b8 + o);
        p = pe_ld_row2<CT>(rb.b2 + o);
    } else {
        const size_t rec = (size_t)((uint32_t)c >> 2) * Tile<CT>::QREC;
        const size_t o = rec + ((uint32_t)c & 3u) * Tile<CT>::QCB;
        v = pe_ld_row4<CT>(rb.b8 + o);
        p = pe_ld_row2<CT>(rb.b2 + o) | pe_ld_row2<CT>(rb.bs + rec) << 16;
    }
}

/* int8 q of byte e of v ^ 0x80808080 (q + 128 in each byte) -> float q, exactly: the byte as
 * the low mantissa bits of 2^23, minus 2^23 + 128 (a byte permute and an add; I2F runs at a
 * quarter of their rate). */
__device__ __forceinline__ float pe_q8_float(uint32_t biased, int e) {
    return __int_as_float(__byte_perm(biased, 0x4B000000u, 0x7540 + e)) - 8388736.f;
}

/* acc[16 g + pos] += x * w for this thread's 4 groups g of one row (pos: the row's nibbles):
 * byte offsets of the position rows by a shift and a mask each, the group's column as the
 * load's immediate (3 instructions per address instead of 4); fused multiply-adds, as the
 * compiler made of `acc += x * w` before. Q8: w = q * scale applied as (x * scale) * q, the
 * scale of the thread's 4 groups (one multiply per row; one more float32 rounding per product
 * than x * (q * scale)). */
template <int CT, bool Q8>
__device__ __forceinline__ void pe_add_row(float *my, typename PeVals<Q8>::T v, uint32_t p,
                                           float xv) {
    typedef Tile<CT> T;
    float w0, w1, w2, w3, xm = xv;
    if constexpr (Q8) {
        xm = __fmul_rn(xv, __half2float(__ushort_as_half((unsigned short)(p >> 16))));
        const uint32_t b = v ^ 0x80808080u;
        w0 = pe_q8_float(b, 0), w1 = pe_q8_float(b, 1);
        w2 = pe_q8_float(b, 2), w3 = pe_q8_float(b, 3);
    } else {
        const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&v.y));
        w0 = a.x, w1 = a.y, w2 = b.x, w3 = b.y;
    }
    constexpr int SH = CT == 32 ? 7 : CT == 64 ? 8 : CT == 128 ? 9 : 10; /* 4 * CT bytes */
    static_assert(4 * CT == 1 << SH, "CT is 32, 64, 128 or 256");
    constexpr uint32_t M = 15u << SH; /* (and only the nibbles of p: bits 0..15) */
    char *mb = reinterpret_cast<char *>(my);
    float *q0 = reinterpret_cast<float *>(mb + ((p << SH) & M));
    float *q1 = reinterpret_cast<float *>(mb + ((p << (SH - 4)) & M));
    float *q2 = reinterpret_cast<float *>(mb + ((SH >= 8 ? p << (SH - 8) : p >> (8 - SH)) & M));
    float *q3 = reinterpret_cast<float *>(mb + ((p >> (12 - SH)) & M));
    /* the 4 addresses differ (column e * TPT + pos * CT, e = 0..3): the 4 loads go first, not
     * one read-modify-write after the other (the compiler cannot know they do not alias) */
    const float s0 = q0[0 * T::TPT], s1 = q1[1 * T::TPT], s2 = q2[2 * T::TPT], s3 = q3[3 * T::TPT];
    q0[0 * T::TPT] = __fmaf_rn(xm, w0, s0);
    q1[1 * T::TPT] = __fmaf_rn(xm, w1, s1);
    q2[2 * T::TPT] = __fmaf_rn(xm, w2, s2);
    q3[3 * T::TPT] = __fmaf_rn(xm, w3, s3);
}

/* Loads of U list entries (j0, j0 + NT, ...) of a team: values, nibbles and x. */
template <int CT, bool Q8>
__device__ __forceinline__ void pe_load_rows(const int2 *list, uint32_t n, uint32_t j0,
                                             const RowBases &rb,
                                             typename PeVals<Q8>::T (&v)[Tile<CT>::U],
                                             uint32_t (&p)[Tile<CT>::U], float (&xv)[Tile<CT>::U]) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < Tile<CT>::U; u++) {
        const uint32_t j = j0 + u * T::NT;
        v[u] = {};
        p[u] = 0u;
        xv[u] = 0.f;
        if (j < n) {
            const int2 e = list[j];
            pe_load_row<CT, Q8>(rb, e.x, v[u], p[u]);
            xv[u] = __int_as_float(e.y);
        }
    }
}

/* acc[16 g + pos] += x * w for the loaded entries that exist (j < n) with key k >= cut
 * (team-uniform per entry). */
template <int CT, bool Q8>
__device__ __forceinline__ void pe_add_rows_taken(uint32_t n, uint32_t j0, float *my,
                                                  const typename PeVals<Q8>::T (&v)[Tile<CT>::U],
                                                  const uint32_t (&p)[Tile<CT>::U],
                                                  const float (&xv)[Tile<CT>::U],
                                                  const uint32_t (&k)[Tile<CT>::U], uint32_t cut) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < Tile<CT>::U; u++) {
        if (j0 + u * T::NT >= n) break;
        if (k[u] < cut) continue;
        pe_add_row<CT, Q8>(my, v[u], p[u], xv[u]);
    }
}

/* Loads of U list entries (j0, j0 + NT, ...) of a team for pe_process: values and nibbles
 * only; x is read from the list again when the row is added (8 fewer registers per batch in
 * flight: spill stores of the kernel 148-152 -> 4-8 bytes). */
template <int CT, bool Q8>
__device__ __forceinline__ void pe_load_rows_vp(const int2 *list, uint32_t n, uint32_t j0,
                                                const RowBases &rb,
                                                typename PeVals<Q8>::T (&v)[Tile<CT>::U],
                                                uint32_t (&p)[Tile<CT>::U]) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < Tile<CT>::U; u++) {
        const uint32_t j = j0 + u * T::NT;
        v[u] = {};
        p[u] = 0u;
        if (j < n) pe_load_row<CT, Q8>(rb, list[j].x, v[u], p[u]);
    }
}
template <int CT, bool Q8>
__device__ __forceinline__ void pe_add_rows_vp(const int2 *list, uint32_t n, uint32_t j0, float *my,
                                               const typename PeVals<Q8>::T (&v)[Tile<CT>::U],
                                               const uint32_t (&p)[Tile<CT>::U]) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < Tile<CT>::U; u++) {
        if (j0 + u * T::NT >= n) break;
        pe_add_row<CT, Q8>(my, v[u], p[u], __int_as_float(list[j0 + u * T::NT].y));
    }
}
/* list (n rows) -> team accumulators; the next U rows load while U add. Team `team` takes list
 * entries team, team + NT, ... (a fixed order: deterministic sums). One copy of the body, the
 * next batch moved into place (unroll 1): the two-copy loop (no moves) was 12.8 KB of code,
 * this one 6.8 KB, and 4096x14336 ran 56.1 -> 47.5 us at effort 1.0 (README_cuda.md, (5)). */
/* mid(): block work run once the first batch's loads are out, before any row is added (it may
 * write the accumulators and x of the list, with a barrier). */
struct PeNoMid {
    __device__ __forceinline__ void operator()() const {}
};
template <int CT, bool Q8, typename F = PeNoMid>
__device__ __forceinline__ void pe_process(const int2 *list, uint32_t n, const uint8_t *tile_base,
                                           float *my, int team, int t, F mid = F()) {
    constexpr uint32_t STEP = Tile<CT>::NT * Tile<CT>::U;
    const RowBases rb = pe_row_bases<CT, Q8>(tile_base, t);
    typename PeVals<Q8>::T v0[Tile<CT>::U], v1[Tile<CT>::U];
    uint32_t p0[Tile<CT>::U], p1[Tile<CT>::U];
    pe_load_rows_vp<CT, Q8>(list, n, team, rb, v0, p0);
    mid();
#pragma unroll 1
    for (uint32_t j0 = team; j0 < n; j0 += STEP) {
        pe_load_rows_vp<CT, Q8>(list, n, j0 + STEP, rb, v1, p1);
        pe_add_rows_vp<CT, Q8>(list, n, j0, my, v0, p0);
#pragma unroll
        for (int u = 0; u < Tile<CT>::U; u++) v0[u] = v1[u], p0[u] = p1[u];
    }
}

/* The own candidates (n, list and keys in shared memory): the first batch of each team loads
 * before the cut is known (wait_cut: block-wide, -> the cut), and rows with key >= cut are
 * added (a team-uniform branch: the same arithmetic as a list of the taken rows). */
template <int CT, bool Q8, typename F>
__device__ __forceinline__ uint32_t pe_process_cands(const int2 *list, const uint32_t *keys,
                                                     uint32_t n, const uint8_t *tile_base,
                                                     float *my, int team, int t, F wait_cut) {
    constexpr uint32_t STEP = Tile<CT>::NT * Tile<CT>::U;
    typename PeVals<Q8>::T v[Tile<CT>::U];
    uint32_t p[Tile<CT>::U], k[Tile<CT>::U];
    float xv[Tile<CT>::U];
    const RowBases rb = pe_row_bases<CT, Q8>(tile_base, t);
    pe_load_rows<CT, Q8>(list, n, team, rb, v, p, xv);
#pragma unroll
    for (int u = 0; u < Tile<CT>::U; u++) {
        const uint32_t j = team + u * Tile<CT>::NT;
        k[u] = j < n ? keys[j] & 0x7FFFFFFFu : 0u;
    }
    const uint32_t cut = wait_cut();
    for (uint32_t j0 = team;;) {
        pe_add_rows_taken<CT, Q8>(n, j0, my, v, p, xv, k, cut);
        j0 += STEP;
        if (j0 >= n) break;
        pe_load_rows<CT, Q8>(list, n, j0, rb, v, p, xv);
#pragma unroll
        for (int u = 0; u < Tile<CT>::U; u++) {
            const uint32_t j = j0 + u * Tile<CT>::NT;
            k[u] = j < n ? keys[j] & 0x7FFFFFFFu : 0u;
        }
    }
    return cut;
}

/* Q8: the records among n list entries (chunk 0 of a record: its row of largest statistic is
 * dispatched exactly when any of its rows is). Block-wide; -> their number (all threads). */
__device__ __forceinline__ uint32_t pe_count_records(const int2 *list, uint32_t n) {
    uint32_t c = 0;
    for (uint32_t i0 = 0; i0 < n; i0 += PE_THREADS) {
        const uint32_t i = i0 + threadIdx.x;
        c += __syncthreads_count(i < n && (list[i].x & 3) == 0);
    }
    return c;
}

/* Output column (inside a tile) of accumulator slot o = pos * CT + e * TPT + t: group 4t + e. */
template <int CT>
__device__ __forceinline__ int pe_slot_col(int o) {
    constexpr int TPT = CT / 4;
    const int pos = o / CT, rem = o % CT;
    return 16 * (4 * (rem % TPT) + rem / TPT) + pos;
}
