/* The effort matmul with thread block clusters (sm_90): one cluster per column tile of a matrix,
 * its C blocks the C splits of the tile's rows (block0 + tile * C + split; C = n_splits, 1..16).
 * Every cluster finds the exact cutoff by itself and sums its own splits, through distributed
 * shared memory: no block meets a block of another cluster, nothing global is polled, the launch
 * is not cooperative (clusters may run in waves), and nothing is reset between calls.
 *
 * Block (tile, split):
 *   0. before the PDL wait: its rows' order/stats (the last pass), this level's shared areas
 *      zeroed, a cluster arrive (the areas are zero before any block adds to them).
 *   1. keys of its split's rows; their level-1 weight histogram (12 key bits) in shared memory;
 *      pushed into the cluster (pe_cluster_push: every bin to the block owning its slice, every
 *      warp's total to every block); after the cluster barrier, every block picks the same
 *      level-1 bin b1 (pe_cluster_pick).
 *   2. rows above b1 (sure) -> list; rows in b1 (candidates) -> own list and count, then a
 *      cluster arrive; the sure rows stream while the other blocks list theirs.
 *   3. every block copies the cluster's candidates (pe_gather_cands) and resolves levels 2 (10
 *      bits) and 3 (9 bits) over them alone: the cutoff, exact (reference.cutoff) and the same
 *      in every cluster; the own candidates >= cut added. When a block kept only some of its
 *      candidates (more than PE_CAND_CAP) or the cluster has more than PE_NB1, levels 2 and 3
 *      run across the cluster as level 1 did.
 *   4. split sums: the block's tile sums in its shared memory; after a cluster barrier each split
 *      adds its slice of the tile over the C blocks in split order -> y; a last barrier keeps
 *      every block's shared memory until all have read it.
 * Every level's histograms are integers and every sum has a fixed order: the same inputs give
 * the same bits. A budget that covers every loaded row (effort 1.0 on a full load) skips 1.-3.
 * (every row of the split streams in row order); effort 0 streams nothing. With a tolerance
 * (tol > 0, pe_cuda.h) a level-1 bin of at most 2 tol n_in n_out multiplications is taken whole
 * or not at all, and 2.-3. have no candidates and no further level. */
#include "common.cuh"
#include "rows.cuh"
#include "launch.cuh"

#define PE_CMAX 16 /* blocks per cluster, at most (Hopper's non-portable limit) */

/* Shared memory after the tile's (Tile<CT>::SMEM), in words: the owned slices of the three
 * levels' cluster histograms (room for a whole level: C = 1), the slice totals per level, this
 * block's level-2/3 histogram and the pick's copy of a slice. */
#define PE_CL_RED1 0
#define PE_CL_RED2 (PE_CL_RED1 + PE_NB1)
#define PE_CL_RED3 (PE_CL_RED2 + PE_NB2)
#define PE_CL_TOT (PE_CL_RED3 + PE_NB3)          /* 3 x PE_CMAX */
#define PE_CL_ZERO (PE_CL_TOT + 3 * PE_CMAX)     /* words zeroed before the PDL wait */
#define PE_CL_NC PE_CL_ZERO                      /* this block's candidates (4 words, 1 used) */
#define PE_CL_HLOC (PE_CL_NC + 4)                /* PE_NB2 */
#define PE_CL_COPY (PE_CL_HLOC + PE_NB2)         /* PE_NB1 / 2: a slice, C >= 2 */
#define PE_CL_WORDS (PE_CL_COPY + PE_NB1)        /* C = 1: a whole level-1 histogram; the
                                                    gathered candidates (at most PE_NB1) */

template <int CT>
struct ClusterTile {
    static constexpr int SMEM = Tile<CT>::SMEM + 4 * PE_CL_WORDS;
};

/* One level's histogram h (nb bins of this block, shared, complete: after a barrier) into the
 * cluster: each nonzero bin added to the block that owns its slice (nb / C bins each, into its
 * red), each warp's total (its 32 * nb / PE_THREADS bins lie in one slice, C <= 16) to every
 * block's tot[slice]; then this thread's cluster arrive (release). Block-wide. */
__device__ __forceinline__ void pe_cluster_push(const uint32_t *h, int nb, uint32_t *red,
                                                uint32_t *tot, uint32_t C) {
    const int per = nb / PE_THREADS, lane = threadIdx.x & 31;
    const int slice = nb / (int)C, first = (int)threadIdx.x * per, owner = first / slice;
    uint32_t *dst = pe_cluster_map(red + (first - owner * slice), (uint32_t)owner);
    uint32_t sum = 0;
    for (int q = 0; q < per; q++) {
        const uint32_t v = h[first + q];
        if (v) pe_dsm_add(dst + q, v);
        sum += v;
    }
#pragma unroll
    for (int d = 16; d >= 1; d /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, d);
    if (lane < (int)C && sum) pe_dsm_add(pe_cluster_map(tot + owner, (uint32_t)lane), sum);
    pe_cluster_arrive();
}

/* After pe_cluster_push: this thread's cluster wait (acquire), then the level's pick from the
 * summed histogram: the slice holding the crossing from the slice totals (every thread alike),
 * that slice copied from its owner into copy, the bin inside it. -> the bin (of nb); *above
 * grown by the weight above it, *wb = its weight. The same answer in every block. Block-wide. */
__device__ __forceinline__ uint32_t pe_cluster_pick(int nb, uint32_t *red, const uint32_t *tot,
                                                    uint32_t C, double budget,
                                                    unsigned long long *above, uint32_t *wb,
                                                    uint32_t *copy) {
    pe_cluster_wait();
    const int slice = nb / (int)C;
    unsigned long long aw = *above;
    int s = (int)C - 1;
    for (; s > 0; s--) { /* the highest slice whose weight reaches the budget (else slice 0) */
        if ((double)(aw + tot[s]) >= budget) break;
        aw += tot[s];
    }
    const uint32_t *src = pe_cluster_map(red, (uint32_t)s);
    for (int i = threadIdx.x; i < slice; i += PE_THREADS) copy[i] = pe_dsm_ld(src + i);
    __syncthreads();
    uint32_t b;
    pe_pick_bin(copy, slice, budget, &b, &aw);
    *wb = copy[b];
    *above = aw;
    __syncthreads(); /* copy is read (wb) before anyone reuses it */
    return (uint32_t)(s * slice) + b;
}

/* This block's level-2 (level 3: prefix set) histogram of its candidate rows -> h (PE_NB2
 * words, zeroed here): level 2 bins key bits 18..9 of the candidates (all in b1), level 3 bits
 * 8..0 of those whose bits 30..9 are prefix. From the own list when it holds them all, else
 * from the split's keys again. Block-wide; h complete on return. */
template <bool Q8, typename TX>
__device__ __forceinline__ void pe_cand_hist(const TX *x, const pe_cuda_matrix &m, int split,
                                             int n_pass, const uint32_t *cand_k, uint32_t n_c,
                                             int level, uint32_t b1, uint32_t prefix,
                                             uint32_t *h) {
    const uint32_t G = (uint32_t)((m.n_out + 15) / 16);
    const uint32_t short_from = pe_short_from(m.n_in, m.n_out);
    for (int i = threadIdx.x; i < PE_NB2; i += PE_THREADS) h[i] = 0u;
    __syncthreads();
    auto add = [&](uint32_t key, uint32_t w) {
        if (level == 2) atomicAdd(&h[(key >> 9) & (PE_NB2 - 1)], w);
        else if ((key & 0xFFFFFE00u) == prefix) atomicAdd(&h[key & (PE_NB3 - 1)], w);
    };
    if (n_c <= PE_CAND_CAP) {
        for (uint32_t i = threadIdx.x; i < n_c; i += PE_THREADS)
            add(cand_k[i] & 0x7FFFFFFFu, G - (cand_k[i] >> 31));
    } else {
        int ri[PE_KR], ci[PE_KR];
        float xv[PE_KR];
        uint32_t key[PE_KR];
        for (int p = 0; p < n_pass; p++) {
            pe_load_keys<Q8>(x, m, split, p, ri, xv, key, ci);
#pragma unroll
            for (int q = 0; q < PE_KR; q++)
                if (ri[q] >= 0 && (key[q] >> 19) == b1) add(key[q], G - pe_is_short(ri[q], short_from));
        }
    }
    __syncthreads();
}

/* Levels 2 and 3 in this block alone: the n candidate keys (key | short << 31, all in the
 * level-1 bin) in `keys` (shared) -> the cut; *above grown as the picks go, *wb the weight of
 * the cut's key. h: PE_NB2 words. Block-wide. */
__device__ __forceinline__ uint32_t pe_resolve_local(const uint32_t *keys, uint32_t n, uint32_t b1,
                                                     uint32_t G, double budget, uint32_t *h,
                                                     unsigned long long *above, uint32_t *wb) {
    uint32_t prefix = b1 << 19;
    for (int level = 2; level <= 3; level++) {
        for (int i = threadIdx.x; i < PE_NB2; i += PE_THREADS) h[i] = 0u;
        __syncthreads();
        for (uint32_t i = threadIdx.x; i < n; i += PE_THREADS) {
            const uint32_t key = keys[i] & 0x7FFFFFFFu, w = G - (keys[i] >> 31);
            if (level == 2) atomicAdd(&h[(key >> 9) & (PE_NB2 - 1)], w);
            else if ((key & 0xFFFFFE00u) == prefix) atomicAdd(&h[key & (PE_NB3 - 1)], w);
        }
        __syncthreads();
        uint32_t b;
        pe_pick_bin(h, level == 2 ? PE_NB2 : PE_NB3, budget, &b, above);
        prefix |= level == 2 ? b << 9 : b;
        *wb = h[b];
    }
    __syncthreads(); /* h read (wb) before anyone reuses it */
    return prefix;
}

/* Every block's candidate keys (its count at cl[PE_CL_NC], its keys in cand_k, published before
 * a cluster arrive; this thread's wait done) -> copy (shared), in block order, if every block
 * kept all of its own and they fit: -> their number, else PE_INVALID (nothing copied). The same
 * answer in every block. Block-wide. */
__device__ __forceinline__ uint32_t pe_gather_cands(uint32_t *cl, const uint32_t *cand_k,
                                                    uint32_t C, uint32_t *copy) {
    __shared__ uint32_t s_nc[PE_CMAX];
    if (threadIdx.x < C) s_nc[threadIdx.x] = pe_dsm_ld(pe_cluster_map(cl + PE_CL_NC, threadIdx.x));
    __syncthreads();
    uint32_t total = 0;
    bool fit = true;
    for (uint32_t b = 0; b < C; b++) total += s_nc[b], fit = fit && s_nc[b] <= PE_CAND_CAP;
    if (!fit || total > PE_NB1) return PE_INVALID;
    for (uint32_t b = 0, off = 0; b < C; off += s_nc[b], b++) {
        const uint32_t *src = pe_cluster_map(cand_k, b);
        for (uint32_t i = threadIdx.x; i < s_nc[b]; i += PE_THREADS) copy[off + i] = pe_dsm_ld(src + i);
    }
    __syncthreads();
    return total;
}

/* 4. the teams' sums -> this block's tile sums (part, shared); cluster barrier; this split's
 * slice of the tile: the C blocks' sums in split order -> y; a last cluster barrier (no block
 * leaves while another reads its part). Block-wide. */
template <typename TY, int CT>
__device__ __forceinline__ void pe_cluster_sums(const pe_cuda_matrix &m, const float *acc,
                                                float *part, int tile, uint32_t split, uint32_t C,
                                                TY *y) {
    typedef Tile<CT> T;
    constexpr int tile_cols = 16 * CT;
    for (int o = threadIdx.x; o < tile_cols; o += PE_THREADS) {
        float s = 0.f;
        for (int j = 0; j < T::NT; j++) s += acc[j * T::ACC + o];
        part[o] = s;
    }
    pe_cluster_arrive();
    pe_cluster_wait();
    const int len = (tile_cols + (int)C - 1) / (int)C, o_end = min(tile_cols, (int)(split + 1) * len);
    for (int o = (int)split * len + threadIdx.x; o < o_end; o += PE_THREADS) {
        float v[PE_CMAX];
#pragma unroll
        for (int b = 0; b < PE_CMAX; b++)
            v[b] = b < (int)C ? pe_dsm_ldf(pe_cluster_map(part + o, (uint32_t)b)) : 0.f;
        float s = 0.f;
#pragma unroll
        for (int b = 0; b < PE_CMAX; b++)
            if (b < (int)C) s += v[b];
        const int64_t gc = (int64_t)tile * tile_cols + pe_slot_col<CT>(o);
        if (gc < m.n_out) pe_store(&y[gc], s);
    }
    pe_cluster_arrive();
    pe_cluster_wait();
}

/* Every row of the split (the budget covers the loaded rows), pass by pass in row order ->
 * the accumulators (zeroed here). Block-wide; -> the rows (and, Q8 with count_rec, *n_rec the
 * records) streamed. */
template <typename TX, int CT, bool Q8>
__device__ __forceinline__ uint32_t pe_stream_all(const TX *x, const pe_cuda_matrix &m,
                                                  int split, int n_pass, uint32_t n_k,
                                                  uint32_t n_stripes, const uint8_t *tile_base,
                                                  float *acc, int2 *list, float *my, int team,
                                                  int t, bool count_rec, uint32_t *n_rec) {
    typedef Tile<CT> T;
    for (int i = threadIdx.x; i < T::NT * T::ACC / 4; i += PE_THREADS)
        reinterpret_cast<float4 *>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    uint32_t n_all = 0;
    for (int p = 0; p < n_pass; p++) {
        int ri[PE_KR], ord[PE_KR], ci_q8[PE_KR];
        int(&ci)[PE_KR] = Q8 ? ci_q8 : ri;
        float sta[PE_KR], xv[PE_KR];
        __syncthreads();
        pe_load_meta<Q8>(m, split, p, ri, ord, sta, ci);
        pe_gather_x(x, ri, ord, xv);
        const uint32_t np = pe_list_rows(p, n_k, split, m.n_splits, n_stripes,
                                         (uint32_t)m.n_rows, ri, ci, list);
        pe_list_x(ri, xv, list);
        __syncthreads();
        pe_process<CT, Q8>(list, np, tile_base, my, team, t);
        n_all += np;
        if (count_rec) *n_rec += pe_count_records(list, np);
    }
    __syncthreads();
    return n_all;
}

template <typename TX, typename TY, int CT, bool Q8>
__global__ void __launch_bounds__(PE_THREADS, 1)
    k_cluster(const TX *__restrict__ x, const pe_cuda_group g, const double *eff_ptr,
              double eff_val, int eff_stride, double tol) {
    typedef Tile<CT> T;
    extern __shared__ __align__(16) unsigned char smem[];
    float *acc = (float *)smem;                                              /* (NT, ACC) */
    int2 *list = (int2 *)(smem + T::ACC_BYTES);                              /* (PASS_ROWS,) */
    int2 *cand_rx = (int2 *)(smem + T::ACC_BYTES + T::LIST_BYTES);           /* (CAND_CAP,) */
    uint32_t *cand_k = (uint32_t *)(cand_rx + PE_CAND_CAP);                  /* (CAND_CAP,) */
    uint32_t *cl = (uint32_t *)(smem + T::SMEM);                             /* PE_CL_* */
    __shared__ uint32_t warp_n[2][PE_KR * PE_WARPS], s_tot[2];
    __shared__ pe_cuda_matrix s_m;
    __shared__ void *s_y;

    int mi = 0;
    while (mi + 1 < g.n_mat && (int)blockIdx.x >= g.m[mi + 1].block0) mi++;
    if (threadIdx.x == 0) {
        s_m = g.m[mi];
        s_y = g.y[mi];
    }
    __syncthreads();
    const pe_cuda_matrix &m = s_m;
    const uint32_t C = (uint32_t)m.n_splits, split = pe_cluster_rank();
    const int tile = ((int)blockIdx.x - m.block0) / (int)C;
    const uint32_t n_stripes = (uint32_t)((m.n_rows + 31) / 32); /* rows < 2^31: 32-bit */
    const uint32_t n_k = (n_stripes - split + C - 1) / C;
    const int n_pass = (int)((n_k + PE_KR * PE_WARPS - 1) / (PE_KR * PE_WARPS));
    const uint32_t short_from = pe_short_from(m.n_in, m.n_out);

    int ri[PE_KR], ci_q8[PE_KR];
    int(&ci)[PE_KR] = Q8 ? ci_q8 : ri; /* chunk of each row: the row itself for fp16 values */
    float xv[PE_KR], sta[PE_KR];
    uint32_t key[PE_KR];
    int ord[PE_KR];
    /* 0. constant data and shared memory only: before the PDL wait */
    pe_load_meta<Q8>(m, (int)split, n_pass - 1, ri, ord, sta, ci);
    for (int i = threadIdx.x; i < PE_NB1; i += PE_THREADS) ((uint32_t *)list)[i] = 0u;
    for (int i = threadIdx.x; i < PE_CL_ZERO; i += PE_THREADS) cl[i] = 0u;
    pe_cluster_arrive(); /* released: the zeros come before any block's adds */
    pe_pdl_wait();
    pe_pdl_launch();
    const double eff = eff_ptr ? __ldcg(eff_ptr + mi * eff_stride) : eff_val;
    const double budget = eff * (double)(m.n_in * m.n_out);
    const bool none = !(eff > 0.0);
    /* n_out < 16: rank rows that hold no output (weight 0) are taken only by a cut of 0, so
     * such a matrix searches even at 1.0 (as bucketmul.cu) */
    const bool all = !none && (double)m.total_w <= budget && m.n_out >= 16;
    const int team = threadIdx.x / T::TPT, t = threadIdx.x % T::TPT;
    float *my = acc + team * T::ACC + t;
    const uint8_t *tile_base = pe_tile_base<CT, Q8>(m, tile);
    const bool count_rec = Q8 && tile == 0;
    pe_cuda_state *st = m.state;
    uint32_t n_rows_done = 0, n_rec = 0, cut = none ? PE_INVALID : 0u;
    unsigned long long mults = none ? 0ull : m.total_w;

    if (none || all) {
        pe_cluster_wait(); /* the arrive of 0. */
        if (all)
            n_rows_done = pe_stream_all<TX, CT, Q8>(x, m, (int)split, n_pass, n_k, n_stripes,
                                                    tile_base, acc, list, my, team, t,
                                                    count_rec, &n_rec);
        else
            for (int i = threadIdx.x; i < T::NT * T::ACC / 4; i += PE_THREADS)
                reinterpret_cast<float4 *>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
        /* 1. keys and the level-1 histogram, passes from the last to the first (pass 0's keys
         * stay in registers) */
        const uint32_t G = (uint32_t)((m.n_out + 15) / 16);
        uint32_t *h1 = (uint32_t *)list; /* zeroed in 0. */
        pe_finish_keys(x, ri, ord, sta, xv, key);
        int loaded = n_pass - 1;
        __syncthreads();
        for (int p = n_pass - 1; p >= 0; p--) {
            if (p != loaded) pe_load_keys<Q8>(x, m, (int)split, loaded = p, ri, xv, key, ci);
#pragma unroll
            for (int q = 0; q < PE_KR; q++)
                if (ri[q] >= 0) atomicAdd(&h1[key[q] >> 19], G - pe_is_short(ri[q], short_from));
        }
        __syncthreads();
        pe_cluster_wait(); /* the arrive of 0.: every block's areas are zero */
        pe_cluster_push(h1, PE_NB1, cl + PE_CL_RED1, cl + PE_CL_TOT, C);
        for (int i = threadIdx.x; i < T::NT * T::ACC / 4; i += PE_THREADS) /* meanwhile */
            reinterpret_cast<float4 *>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        unsigned long long aw = 0;
        uint32_t wb;
        const uint32_t b1 = pe_cluster_pick(PE_NB1, cl + PE_CL_RED1, cl + PE_CL_TOT, C, budget,
                                            &aw, &wb, cl + PE_CL_COPY);
        /* with a tolerance: level 1 decides when bin b1 weighs at most twice it: the bin whole
         * or not at all, whichever lands nearer the budget (off by at most half the bin) */
        const bool near = tol > 0.0 && (double)wb <= 2.0 * tol * (double)(m.n_in * m.n_out);
        const bool take_b1 = near && budget - (double)aw >= 0.5 * (double)wb;
        const int thr = take_b1 ? (int)b1 - 1 : (int)b1; /* sure rows: bin > thr */
        if (near) {
            cut = (take_b1 ? b1 : b1 + 1u) << 19;
            mults = take_b1 ? aw + wb : aw;
        }

        /* 2. every pass: sure rows -> list (while they fit), candidates -> own list; then the
         * candidates' level-2 histogram goes out and the listed sure rows stream, then the
         * passes whose sure rows did not fit */
        uint32_t n_c = 0, n_list = 0;
        int pend = n_pass;
        for (int p = 0; p < n_pass; p++) {
            if (p != loaded) pe_load_keys<Q8>(x, m, (int)split, loaded = p, ri, xv, key, ci);
            const bool app = pend == n_pass;
            const uint32_t nd = split_rows(m, thr, app, !near, false, tile, 0, ri, ci, xv,
                                           key, list, n_list, cand_rx, cand_k, &n_c, warp_n,
                                           s_tot, 0u, false, short_from);
            if (app && (n_list == 0 || n_list + nd <= PE_PASS_ROWS)) n_list += nd;
            else if (app) pend = p;
        }
        uint32_t *hloc = cl + PE_CL_HLOC;
        if (!near) { /* the candidates out: every block gathers them after the barrier */
            if (threadIdx.x == 0) cl[PE_CL_NC] = n_c;
            pe_cluster_arrive();
        }
        pe_process<CT, Q8>(list, n_list, tile_base, my, team, t);
        n_rows_done = n_list;
        if (count_rec) n_rec += pe_count_records(list, n_list);
        __syncthreads();
        for (int p = pend; p < n_pass; p++) {
            if (p != loaded) pe_load_keys<Q8>(x, m, (int)split, loaded = p, ri, xv, key, ci);
            const uint32_t nd = split_rows(m, thr, true, false, false, tile, 0, ri, ci, xv,
                                           key, list, 0u, cand_rx, cand_k, &n_c, warp_n, s_tot,
                                           0u, false, short_from);
            pe_process<CT, Q8>(list, nd, tile_base, my, team, t);
            n_rows_done += nd;
            if (count_rec) n_rec += pe_count_records(list, nd);
            __syncthreads();
        }

        /* 3. levels 2 and 3 -> the cut (the first candidate rows load meanwhile); the own
         * candidates with key >= cut */
        auto resolve = [&]() -> uint32_t { /* block-wide */
            pe_cluster_wait();
            const uint32_t n_all = pe_gather_cands(cl, cand_k, C, cl + PE_CL_COPY);
            if (n_all != PE_INVALID) { /* levels 2-3 here, on the cluster's candidates */
                const uint32_t c = pe_resolve_local(cl + PE_CL_COPY, n_all, b1, G, budget, hloc,
                                                    &aw, &wb);
                mults = aw + wb;
                return c;
            }
            /* a block kept only some of its candidates, or too many: levels 2-3 across the
             * cluster, each block's histogram from its own keys */
            pe_cand_hist<Q8>(x, m, (int)split, n_pass, cand_k, n_c, 2, b1, 0u, hloc);
            pe_cluster_push(hloc, PE_NB2, cl + PE_CL_RED2, cl + PE_CL_TOT + PE_CMAX, C);
            const uint32_t b2 = pe_cluster_pick(PE_NB2, cl + PE_CL_RED2, cl + PE_CL_TOT + PE_CMAX,
                                                C, budget, &aw, &wb, cl + PE_CL_COPY);
            const uint32_t prefix = b1 << 19 | b2 << 9;
            pe_cand_hist<Q8>(x, m, (int)split, n_pass, cand_k, n_c, 3, b1, prefix, hloc);
            pe_cluster_push(hloc, PE_NB3, cl + PE_CL_RED3, cl + PE_CL_TOT + 2 * PE_CMAX, C);
            const uint32_t b3 = pe_cluster_pick(PE_NB3, cl + PE_CL_RED3,
                                                cl + PE_CL_TOT + 2 * PE_CMAX, C, budget, &aw, &wb,
                                                cl + PE_CL_COPY);
            mults = aw + wb;
            return prefix | b3;
        };
        uint32_t n_take = 0;
        if (near) {
            /* no candidates: the cut is known */
        } else if (n_c <= PE_CAND_CAP) {
            cut = pe_process_cands<CT, Q8>(cand_rx, cand_k, n_c, tile_base, my, team, t, resolve);
            for (uint32_t i0 = 0; i0 < n_c; i0 += PE_THREADS) {
                const uint32_t i = i0 + threadIdx.x;
                const bool taken = i < n_c && (cand_k[i] & 0x7FFFFFFFu) >= cut;
                n_take += __syncthreads_count(taken);
                if (count_rec) n_rec += __syncthreads_count(taken && (cand_rx[i].x & 3) == 0);
            }
        } else { /* more candidates than shared memory holds: the split's keys again */
            cut = resolve();
            for (int p = 0; p < n_pass; p++) {
                pe_load_keys<Q8>(x, m, (int)split, p, ri, xv, key, ci);
                bool take[PE_KR];
#pragma unroll
                for (int q = 0; q < PE_KR; q++)
                    take[q] = ri[q] >= 0 && (key[q] >> 19) == b1 && key[q] >= cut;
                const uint32_t n = pe_compact(take, ci, xv, list, 0, warp_n[0], &s_tot[0]);
                pe_process<CT, Q8>(list, n, tile_base, my, team, t);
                n_take += n;
                if (count_rec) n_rec += pe_count_records(list, n);
                __syncthreads();
            }
        }
        n_rows_done += n_take;
        __syncthreads();
    }
    if (tile == 0 && threadIdx.x == 0) {
        atomicAdd(&st->info_rows, (unsigned long long)n_rows_done);
        if (Q8) atomicAdd(&st->info_records, (unsigned long long)n_rec);
        if (split == 0) {
            st->cut = cut;
            st->mults = mults;
            atomicAdd(&st->info_mults, mults);
        }
    }
    __syncthreads(); /* every team's accumulators are final (effort 0: zeroed) */
    pe_cluster_sums<TY, CT>(m, acc, (float *)list, tile, split, C, (TY *)s_y);
}

/* ---------------------------------------------------------------- launch */

template <typename TX, typename TY, int CT, bool Q8>
static cudaError_t launch(const pe_cuda_group *g, const void *x, void *stream, int pdl,
                          const double *eff_ptr, double eff_val, int eff_stride, double tol) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[2];
    int na = 0;
    attr[na].id = cudaLaunchAttributeClusterDimension;
    attr[na].val.clusterDim.x = (unsigned)g->m[0].n_splits;
    attr[na].val.clusterDim.y = 1;
    attr[na++].val.clusterDim.z = 1;
    if (pdl) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    cfg.gridDim = dim3((unsigned)g->n_workers);
    cfg.blockDim = dim3(PE_THREADS);
    cfg.dynamicSmemBytes = ClusterTile<CT>::SMEM;
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = na;
    return cudaLaunchKernelEx(&cfg, k_cluster<TX, TY, CT, Q8>, (const TX *)x, *g, eff_ptr,
                              eff_val, eff_stride, tol);
}

template <int CT>
static cudaError_t max_clusters(int C, int *n) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = (unsigned)C;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3((unsigned)C);
    cfg.blockDim = dim3(PE_THREADS);
    cfg.dynamicSmemBytes = ClusterTile<CT>::SMEM;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return cudaOccupancyMaxActiveClusters(n, k_cluster<__half, float, CT, false>, &cfg);
}

extern "C" int pe_cuda_cluster_init(void) {
    return pe_status_of(pe_for_each_kind([](auto tx, auto ty, auto ct, auto q8) {
        auto k = k_cluster<pe_type_of<decltype(tx)>, pe_type_of<decltype(ty)>, ct.value,
                           q8.value != 0>;
        cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             ClusterTile<ct.value>::SMEM);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        return e;
    }));
}

extern "C" int pe_cuda_max_clusters(int C, int ct, int *n) {
    if (!n || C < 1 || C > PE_CMAX) return PE_CUDA_ERR_ARG;
    *n = 0;
    switch (ct) {
        case 32: return pe_status_of(max_clusters<32>(C, n));
        case 64: return pe_status_of(max_clusters<64>(C, n));
        case 128: return pe_status_of(max_clusters<128>(C, n));
        case 256: return pe_status_of(max_clusters<256>(C, n));
        default: return PE_CUDA_ERR_ARG;
    }
}

extern "C" int pe_cuda_matmul_cluster(const pe_cuda_group *g, const void *x, int x_dtype,
                                      int64_t n_tokens, const double *effort_ptr,
                                      double effort_val, int effort_each, int y_dtype,
                                      void *stream, int pdl, double tol) {
    const int32_t C = g ? g->m[0].n_splits : 0; /* slices of every level: a power of two */
    if (C < 1 || C > PE_CMAX || (C & (C - 1)) || !pe_group_ok(g, C) || n_tokens < 0 ||
        !(tol >= 0.0 && tol <= 0.5) || (effort_each != 0 && (effort_each != 1 || !effort_ptr)))
        return PE_CUDA_ERR_ARG;
    return pe_per_token(g, x, x_dtype, y_dtype, n_tokens, [&](const pe_cuda_group *gt,
                                                               const void *xt) {
        return pe_by_kind(x_dtype, y_dtype, g->m[0].ct, g->m[0].q8,
                          [&](auto tx, auto ty, auto ct, auto q8) {
                              return launch<pe_type_of<decltype(tx)>, pe_type_of<decltype(ty)>,
                                            ct.value, q8.value != 0>(gt, xt, stream, pdl,
                                                                     effort_ptr, effort_val,
                                                                     effort_each, tol);
                          });
    });
}
