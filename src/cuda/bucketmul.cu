/* The effort matmul as one cooperative kernel per call (see pe_cuda.h for the block roles).
 *
 * Worker (tile, split) of a matrix:
 *   1. keys of its split's rows in registers (order/stats read before the PDL wait); its share of
 *      the level-1 weight histogram (12 key bits) -> global (REDs, no fence); count hist_done.
 *   2. wait for every worker's histogram: with a search, the histogram is loaded until its bins
 *      sum to the loaded total (complete); pick the level-1 bin b1 (every block the same answer).
 *      Rows above b1 are surely dispatched: -> shared list. Rows in b1 are candidates: -> own
 *      shared list, and its share of them -> the global candidate list (tagged keys), whose
 *      tagged count goes out as soon as it is known (no fence). With a search, every pass's
 *      candidates go out before any row streams (sure rows of the passes appended to one list
 *      while it holds them; the rest stream pass by pass after it, keys loaded again).
 *   3. stream the sure rows into shared accumulators (the bulk of the bytes) while the selector
 *      resolves the cutoff; then wait for the cut, add the own candidates with key >= cut.
 *   4. split sums: tagged partial tiles in global memory; every split of a tile adds its slice
 *      of them in split order -> y, polling each word until it carries this call's tag. Nothing
 *      is reset: the meeting counter only grows, and a call waits for base + participants;
 *      the other meetings are tagged words (pe_cuda_state).
 * Selector of a matrix: clears the next call's histogram buffer, waits for the histograms
 * (by their sum, as the workers), advances the epoch, picks b1, polls the workers' tagged candidate counts, runs levels 2 and 3
 * over the candidates (resolve.cuh; the last level by one warp when the level-2 bin holds at most
 * 32 of them) and publishes the tagged cut.
 * When the effort covers every loaded row (budget >= total_w: effort 1.0 on a full load, or
 * above the loaded total) there is no search (PE_MODE_ALL): each worker streams every row of
 * its split in row order (pe_worker_all: no keys, no histogram, no lists by ballot, no
 * meeting); at effort 0 (PE_MODE_NONE) the workers do not wait either.
 * Every output is summed in a fixed order (rows in list order per team, teams in order, splits
 * in order) and the cutoff comes from integer histograms: the same inputs give the same bits.
 * int8 values (Q8, pe_cuda.h): the same kernel with the list entries naming each row's chunk in
 * its record (slot) and the scale of the thread's 4 groups applied per row (rows.cuh); tile 0
 * also counts the dispatched records (info_records), for the bytes read. */
#include "common.cuh"
#include "resolve.cuh"
#include "rows.cuh"
#include "launch.cuh"

#include <stddef.h>

#define PE_MODE_SEARCH 0
#define PE_MODE_NONE 1
#define PE_MODE_ALL 2 /* budget >= total_w: every loaded row, no search */

static_assert(sizeof(pe_cuda_state) == 64 && offsetof(pe_cuda_state, tbase) == 16 &&
                  offsetof(pe_cuda_state, hbase) == 28 && offsetof(pe_cuda_state, info_mults) == 40 &&
                  offsetof(pe_cuda_state, cut_word) == 8,
              "the kernel reads the bases as one uint4 word");

#define PE_OWNP_MAX 32 /* the own partial tile from shared memory with at most this many splits
                          (more: 4096x4096 and 4096x1024 ran 0.1-0.5 us slower with it) */
#define PE_POLL_NS 128 /* pause between polls of a split partial that is not in yet */

/* The effort of a call: matrix i's is ptr[i * stride] (device float64; stride 1: one per
 * matrix, 0: one for all) when ptr is not NULL, else val. */
struct pe_effort {
    const double *ptr;
    double val;
    int stride;
};

/* Slice `split` of a tile (its share of the 16 * CT slots): the sum of the n_splits partial
 * tiles -> y. Every split of the tile runs it, once all partials are in. K lanes per slot each
 * add every K-th split, then a fixed butterfly: a fixed order, so the same bits every call.
 * own: this split's partial tile in shared memory (or NULL), taken from there instead of being
 * loaded back (the same values in the same order; the load of a word this block had just
 * stored mostly missed its tag and slept a poll: README_cuda.md, update (6)). */
template <typename TY, int CT>
__device__ __forceinline__ void sum_slice(const pe_cuda_matrix &m, int tile, int split, TY *y,
                                          uint32_t tag, const float *own) {
    const int tile_cols = 16 * CT, len = (tile_cols + m.n_splits - 1) / m.n_splits;
    const int ns = m.n_splits;
    const int own_sp = own ? split : -1;
    const int lk = ns > 64 ? 4 : ns > 32 ? 3 : ns > 16 ? 2 : ns > 8 ? 1 : 0, K = 1 << lk;
    const int k = threadIdx.x & (K - 1), per_pass = PE_THREADS >> lk; /* shifts: no division */
    const size_t split_stride = (size_t)m.n_tiles * tile_cols;
    const int o_end = min(tile_cols, (split + 1) * len);
    for (int base = split * len; base < o_end; base += per_pass) {
        const int o = base + (int)(threadIdx.x >> lk);
        float s = 0.f;
        if (o < o_end) {
            const unsigned long long *p = m.partial + (size_t)tile * tile_cols + o;
            for (int sp0 = k; sp0 < ns; sp0 += 8 * K) {
                unsigned long long v[8]; /* 8 polls in flight, then each until its tag */
#pragma unroll
                for (int u = 0; u < 8; u++)
                    v[u] = sp0 + u * K == own_sp ? pe_tagged(tag, __float_as_uint(own[o]))
                           : sp0 + u * K < ns
                               ? pe_ld_relaxed64(p + (size_t)(sp0 + u * K) * split_stride)
                               : pe_tagged(tag, 0u);
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const uint32_t b = (uint32_t)(v[u] >> 32) == tag
                                           ? (uint32_t)v[u]
                                           : pe_poll_tag<false, PE_POLL_NS>(
                                                 p + (size_t)(sp0 + u * K) * split_stride, tag);
                    s += __uint_as_float(b);
                }
            }
        }
        for (int d = K / 2; d >= 1; d /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, d);
        if (o < o_end && k == 0) {
            const int64_t gc = (int64_t)tile * tile_cols + pe_slot_col<CT>(o);
            if (gc < m.n_out) pe_store(&y[gc], s);
        }
    }
}

/* This thread's loaded histogram words v -> h (shared) -> the bin b1 holding the budget and
 * *above, the weight above it. Block-wide. */
__device__ __forceinline__ int pick_staged(const uint4 *v, uint32_t *h, double budget,
                                           unsigned long long *above) {
#pragma unroll
    for (int q = 0; q < PE_NB1 / 4 / PE_THREADS; q++)
        reinterpret_cast<uint4 *>(h)[q * PE_THREADS + threadIdx.x] = v[q];
    __syncthreads();
    uint32_t b;
    *above = 0;
    pe_pick_bin(h, PE_NB1, budget, &b, above);
    return (int)b;
}

/* Search mode: the level-1 histogram is loaded until its bins sum to total_w, which proves
 * every worker's share is in: the bins only grow from zero during the call, so a sum of the
 * loaded values equal to the final sum means each loaded bin is final. This replaces the
 * workers' fence, the meeting counter and its poll before the load (README_cuda.md, update 4).
 * Block-wide; h: PE_NB1 words of shared memory. -> b1; *above = the weight above it. */
__device__ __forceinline__ int pick_level1_poll(const uint32_t *hist, uint32_t *h, double budget,
                                                unsigned long long total_w,
                                                unsigned long long *above) {
    __shared__ unsigned long long s_ww[2][PE_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint4 *src = (const uint4 *)hist;
    uint4 v[PE_NB1 / 4 / PE_THREADS];
    for (uint32_t it = 0;; it++) {
#pragma unroll
        for (int q = 0; q < PE_NB1 / 4 / PE_THREADS; q++)
            v[q] = __ldcg(src + q * PE_THREADS + threadIdx.x);
        unsigned long long sm = 0;
#pragma unroll
        for (int q = 0; q < PE_NB1 / 4 / PE_THREADS; q++)
            sm += (unsigned long long)v[q].x + v[q].y + v[q].z + v[q].w;
#pragma unroll
        for (int d = 16; d >= 1; d /= 2) sm += __shfl_xor_sync(0xFFFFFFFFu, sm, d);
        if (lane == 0) s_ww[it & 1][warp] = sm;
        __syncthreads(); /* s_ww[it & 1] is written again only after the next barrier */
        unsigned long long tot = 0;
#pragma unroll
        for (int k = 0; k < PE_WARPS; k++) tot += s_ww[it & 1][k];
        if (tot == total_w) break; /* the same answer in every thread */
        if (tot > total_w || it == (1u << 24)) __trap(); /* not zeroed, or a share never came */
    }
    return pick_staged(v, h, budget, above);
}

/* hist (PE_NB1 weights, global) -> h (shared) -> b1 and the weight above it, by mode;
 * total_w != 0 (search mode): pick_level1_poll. Block-wide. */
__device__ __forceinline__ int pick_level1(const uint32_t *hist, uint32_t *h, int mode,
                                           double budget, unsigned long long *above,
                                           unsigned long long total_w = 0) {
    *above = 0;
    if (mode == PE_MODE_NONE) return PE_NB1; /* nothing is above, nothing is a candidate */
    if (mode == PE_MODE_ALL) return -1;      /* every row is above */
    if (total_w) return pick_level1_poll(hist, h, budget, total_w, above);
    const uint4 *src = (const uint4 *)hist;
    uint4 v[PE_NB1 / 4 / PE_THREADS];
#pragma unroll
    for (int q = 0; q < PE_NB1 / 4 / PE_THREADS; q++) v[q] = __ldcg(src + q * PE_THREADS + threadIdx.x);
    return pick_staged(v, h, budget, above);
}

/* Selector: the per-worker counts, each polled until it carries this call's tag -> s_off
 * (exclusive prefix, n_w + 1 entries; n_w < PE_THREADS); -> the number of candidates.
 * Block-wide. */
__device__ __forceinline__ uint32_t gather_counts(const pe_cuda_matrix &m, uint32_t n_w,
                                                  uint32_t *s_off, uint32_t tag) {
    __shared__ uint32_t s_wsum[PE_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned long long *cw =
        (const unsigned long long *)(m.cand + (size_t)threadIdx.x * pe_cand_stride(m));
    const uint32_t c = threadIdx.x < n_w ? pe_poll_tag<false>(cw, tag) : 0u; /* keys: own tags */
    uint32_t incl = c;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += o;
    }
    if (lane == 31) s_wsum[warp] = incl;
    __syncthreads();
    uint32_t before = 0;
    for (int k = 0; k < warp; k++) before += s_wsum[k];
    if (threadIdx.x <= n_w) s_off[threadIdx.x] = before + incl - c;
    __syncthreads();
    return s_off[n_w];
}

/* 4. teams -> this split's sums, in slot order (coalesced, tagged partial writes); with
 * several splits, every split of the tile then sums its slice, each partial once tagged (with
 * at most PE_OWNP_MAX splits its own from own: shared memory, free by then). */
template <typename TY, int CT>
__device__ __forceinline__ void pe_write_sums(const pe_cuda_matrix &m, const float *acc, int tile,
                                              int split, TY *y, uint32_t tag, float *own) {
    typedef Tile<CT> T;
    const int tile_cols = 16 * CT;
    unsigned long long *part = m.partial + ((size_t)split * m.n_tiles + tile) * tile_cols;
    for (int o = threadIdx.x; o < tile_cols; o += PE_THREADS) {
        float s = 0.f;
        for (int j = 0; j < T::NT; j++) s += acc[j * T::ACC + o];
        if (m.n_splits == 1) {
            const int64_t gc = (int64_t)tile * tile_cols + pe_slot_col<CT>(o);
            if (gc < m.n_out) pe_store(&y[gc], s);
        } else {
            pe_st_relaxed64(&part[o], pe_tagged(tag, __float_as_uint(s)));
            if (m.n_splits <= PE_OWNP_MAX) own[o] = s;
        }
    }
    if (m.n_splits > 1) {
        const bool ownp = m.n_splits <= PE_OWNP_MAX;
        if (ownp) __syncthreads();
        sum_slice<TY, CT>(m, tile, split, y, tag, ownp ? own : nullptr);
    }
}

/* A worker when the effort covers every loaded row (PE_MODE_ALL: 1.0 on a full load): every
 * row of its split is dispatched, so no keys, no histogram, no ballots and no meeting. The rows
 * of a pass are listed by their index (row order), the first batch's loads go out before x is
 * in (the accumulators are zeroed meanwhile), the passes from the last (its order loaded before
 * the PDL wait) to the first; then the split sums as in the search. Out of line (its code and
 * registers apart from the search's; inline and out of line, the search's times moved alike,
 * 0 to +0.4 us: README_cuda.md, update (6)). mp: the matrix (shared); yv: its output; s1y,
 * s1w: the bases this thread read. */
template <typename TX, typename TY, int CT, bool Q8>
__device__ __noinline__ void pe_worker_all(const TX *x, const pe_cuda_matrix *mp, void *yv,
                                           uint32_t tag, uint32_t s1y, uint32_t s1w, int split,
                                           int tile, int n_pass, uint32_t n_k,
                                           uint32_t n_stripes) {
    typedef Tile<CT> T;
    extern __shared__ __align__(16) unsigned char smem[];
    float *acc = (float *)smem;
    int2 *list = (int2 *)(smem + T::ACC_BYTES);
    const pe_cuda_matrix &m = *mp;
    pe_cuda_state *st = m.state;
    const int team = threadIdx.x / T::TPT, t = threadIdx.x % T::TPT;
    float *my = acc + team * T::ACC + t;
    const uint8_t *tile_base = pe_tile_base<CT, Q8>(m, tile);
    int ri[PE_KR], ord[PE_KR], ci_q8[PE_KR];
    int(&ci)[PE_KR] = Q8 ? ci_q8 : ri; /* chunk of each row: the row itself for fp16 values */
    float sta[PE_KR], xv[PE_KR];
    pe_load_meta<Q8>(m, split, n_pass - 1, ri, ord, sta, ci); /* as before the PDL wait: cached */
    pe_gather_x(x, ri, ord, xv);
    __syncthreads(); /* the list space was zeroed (as the search's histogram) before */
    const uint32_t n = pe_list_rows(n_pass - 1, n_k, split, m.n_splits, n_stripes,
                                    (uint32_t)m.n_rows, ri, ci, list);
    /* counted in with no fence (nothing this block wrote matters to the selector); every thread
     * has used the bases before this barrier, whose predicate reads them */
    if (__syncthreads_or(s1y == 0xFFFFFFFFu && s1w == 0xFFFFFFFFu) && threadIdx.x == 0)
        asm volatile("" ::: "memory");
    if (threadIdx.x == 0) atomicAdd(&st->hist_done, 1u);
    pe_process<CT, Q8>(list, n, tile_base, my, team, t, [&] {
        for (int i = threadIdx.x; i < T::NT * T::ACC / 4; i += PE_THREADS)
            reinterpret_cast<float4 *>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        pe_list_x(ri, xv, list);
        __syncthreads();
    });
    uint32_t n_all = n, n_rec = Q8 && tile == 0 ? pe_count_records(list, n) : 0u;
    for (int p = n_pass - 2; p >= 0; p--) {
        __syncthreads();
        pe_load_meta<Q8>(m, split, p, ri, ord, sta, ci);
        pe_gather_x(x, ri, ord, xv);
        const uint32_t np = pe_list_rows(p, n_k, split, m.n_splits, n_stripes,
                                         (uint32_t)m.n_rows, ri, ci, list);
        pe_list_x(ri, xv, list);
        __syncthreads();
        pe_process<CT, Q8>(list, np, tile_base, my, team, t);
        n_all += np;
        if (Q8 && tile == 0) n_rec += pe_count_records(list, np);
    }
    __syncthreads();
    if (tile == 0 && threadIdx.x == 0) {
        atomicAdd(&st->info_rows, (unsigned long long)n_all);
        if (Q8) atomicAdd(&st->info_records, (unsigned long long)n_rec);
    }
    pe_write_sums<TY, CT>(m, acc, tile, split, (TY *)yv, tag, (float *)list);
}

template <typename TX, typename TY, int CT, bool Q8>
__global__ void __launch_bounds__(PE_THREADS, 1)
    k_effort(const TX *__restrict__ x, const pe_cuda_group g, const pe_effort ef) {
    typedef Tile<CT> T;
    extern __shared__ __align__(16) unsigned char smem[];
    float *acc = (float *)smem;                                              /* (NT, ACC) */
    int2 *list = (int2 *)(smem + T::ACC_BYTES);                              /* (PASS_ROWS,) */
    int2 *cand_rx = (int2 *)(smem + T::ACC_BYTES + T::LIST_BYTES);           /* (CAND_CAP,) */
    uint32_t *cand_k = (uint32_t *)(cand_rx + PE_CAND_CAP);                  /* (CAND_CAP,) */
    __shared__ uint32_t warp_n[2][PE_KR * PE_WARPS], s_tot[2];
    __shared__ pe_cuda_matrix s_m;
    __shared__ void *s_y;

    const bool selector = (int)blockIdx.x >= g.n_workers;
    int mi = selector ? (int)blockIdx.x - g.n_workers : 0;
    if (!selector)
        while (mi + 1 < g.n_mat && (int)blockIdx.x >= g.m[mi + 1].block0) mi++;
    if (threadIdx.x == 0) {
        s_m = g.m[mi];
        s_y = g.y[mi];
    }
    __syncthreads();
    const pe_cuda_matrix &m = s_m;
    pe_cuda_state *st = m.state;
    const int local = selector ? 0 : (int)blockIdx.x - m.block0;
    const int split = (uint32_t)local / (uint32_t)m.n_tiles, tile = local - split * m.n_tiles;
    const uint32_t n_workers = (uint32_t)(m.n_tiles * m.n_splits);
    const uint32_t G = (uint32_t)((m.n_out + 15) / 16);
    const uint32_t short_from = pe_short_from(m.n_in, m.n_out);
    const uint32_t n_stripes = (uint32_t)((m.n_rows + 31) / 32); /* rows < 2^31: 32-bit */
    const uint32_t n_k =
        selector ? 0u : (n_stripes - split + m.n_splits - 1) / (uint32_t)m.n_splits;
    const int n_pass = (int)((n_k + PE_KR * PE_WARPS - 1) / (PE_KR * PE_WARPS));

    int ri[PE_KR], ci_q8[PE_KR];
    int(&ci)[PE_KR] = Q8 ? ci_q8 : ri; /* chunk of each row: the row itself for fp16 values */
    float xv[PE_KR];
    uint32_t key[PE_KR];
    int ord[PE_KR];
    float sta[PE_KR];
    if (!selector) { /* constant data and shared memory only: before the PDL wait */
        pe_load_meta<Q8>(m, split, n_pass - 1, ri, ord, sta, ci); /* the last pass: see 1. */
        for (int i = threadIdx.x; i < PE_NB1; i += PE_THREADS) ((uint32_t *)list)[i] = 0u;
    }
    pe_pdl_wait();
    pe_pdl_launch();
    const uint4 s1 = __ldcg((const uint4 *)st + 1); /* (tbase, epoch, cut, hbase) */
    const uint32_t epoch = s1.y, parity = epoch & 1u, tag = epoch + 1u; /* tag: this call's */
    const uint32_t all_in = s1.w + n_workers; /* hist_done target of this call */
    uint32_t *hist = m.hist + parity * PE_NB1;
    const double eff = ef.ptr ? __ldcg(ef.ptr + mi * ef.stride) : ef.val; /* m's: every block */
    const double budget = eff * (double)(m.n_in * m.n_out);
    /* n_out < 16: rows of ranks >= n_out hold no output (weight 0, key 0); the cutoff takes
     * them only when it is 0, so such a matrix searches even at 1.0 (an H100 run counted them) */
    const int mode = !(eff > 0.0) ? PE_MODE_NONE
                     : (double)m.total_w <= budget && m.n_out >= 16 ? PE_MODE_ALL
                                                                    : PE_MODE_SEARCH;

    if (selector) { /* ------------------------------------------------ selector block */
        uint32_t *other = m.hist + (parity ^ 1u) * PE_NB1; /* the last call's: next call's */
        for (int i = threadIdx.x; i < PE_NB1 / 4; i += PE_THREADS)
            reinterpret_cast<uint4 *>(other)[i] = make_uint4(0u, 0u, 0u, 0u);
        uint32_t *h = (uint32_t *)acc, *s_cand = h + PE_NB2;
        const uint32_t cap = ((T::ACC_BYTES / 4 - PE_NB2) / 4096) * 4096;
        const bool hsum = mode == PE_MODE_SEARCH; /* the complete histogram is the meeting */
        if (!hsum) {
            pe_wait_geq(&st->hist_done, all_in);
            if (threadIdx.x == 0) { /* every worker has read the bases: the next call's */
                st->epoch = epoch + 1u;
                st->hbase = all_in;
            }
        }
        uint32_t cut;
        unsigned long long mults;
        if (mode == PE_MODE_SEARCH) {
            unsigned long long aw;
            const int b1 = pick_level1(hist, (uint32_t *)list, mode, budget, &aw,
                                       hsum ? m.total_w : 0ull);
            if (hsum && threadIdx.x == 0) { /* every share is in, so every worker has read the
                                               bases (before its share): the next call's */
                st->epoch = epoch + 1u;
                st->hbase = all_in;
            }
            uint32_t *s_off = (uint32_t *)list; /* (n_workers + 1,) */
            const uint32_t n_c = gather_counts(m, n_workers, s_off, tag);
            const size_t stride = pe_cand_stride(m);
            auto fetch = [&](uint32_t i) { /* i-th candidate: its segment */
                uint32_t lo = 0, hi = n_workers; /* s_off[lo] <= i < s_off[hi] */
                while (hi - lo > 1) {
                    const uint32_t mid = (lo + hi) / 2;
                    if (s_off[mid] <= i) lo = mid; else hi = mid;
                }
                return (const unsigned long long *)(m.cand + (size_t)lo * stride) + 1 +
                       (i - s_off[lo]);
            };
            cut = pe_resolve(m, budget, n_c, (uint32_t)b1, aw, s_cand, cap, h, &mults, fetch, tag);
        } else {
            cut = mode == PE_MODE_ALL ? 0u : PE_INVALID;
            mults = mode == PE_MODE_NONE ? 0ull : m.total_w;
        }
        if (threadIdx.x == 0) { /* the workers read the cut from its tagged word alone */
            pe_st_relaxed64(&st->cut_word, pe_tagged(tag, cut));
            st->cut = cut;
            st->mults = mults;
            atomicAdd(&st->info_mults, mults);
        }
        return;
    }

    /* ------------------------------------------------------------------ worker block */
    if (mode == PE_MODE_ALL) {
        pe_worker_all<TX, TY, CT, Q8>(x, &m, s_y, tag, s1.y, s1.w, split, tile, n_pass, n_k,
                                      n_stripes);
        return;
    }
    const int team = threadIdx.x / T::TPT, t = threadIdx.x % T::TPT;
    float *my = acc + team * T::ACC + t;
    const uint8_t *tile_base = pe_tile_base<CT, Q8>(m, tile);
    pe_finish_keys(x, ri, ord, sta, xv, key);
    int loaded = n_pass - 1; /* the pass whose keys are in registers */
    { /* 1. this worker's rounds (round % n_tiles == tile) of the level-1 weight histogram.
         Passes from the last to the first: pass 0's keys stay in registers for 2. */
        uint32_t *h1 = (uint32_t *)list; /* zeroed before the PDL wait */
        __syncthreads();
        if (mode == PE_MODE_SEARCH) {
            for (int p = n_pass - 1; p >= 0; p--) {
                if (p != loaded) pe_load_keys<Q8>(x, m, split, loaded = p, ri, xv, key, ci);
                /* the round's tile by a wrapped counter: one division per pass, not 8 inlined
                 * (once-per-call code: its size costs, README_cuda.md update (4)) */
                int rt = (int)((uint32_t)(p * PE_KR) % (uint32_t)m.n_tiles);
#pragma unroll
                for (int q = 0; q < PE_KR; q++) {
                    if (ri[q] >= 0 && rt == tile)
                        atomicAdd(&h1[key[q] >> 19], G - pe_is_short(ri[q], short_from));
                    if (++rt == m.n_tiles) rt = 0;
                }
            }
        }
        __syncthreads();
        if (mode == PE_MODE_SEARCH)
            for (int i = threadIdx.x; i < PE_NB1; i += PE_THREADS)
                if (h1[i]) atomicAdd(&hist[i], h1[i]);
        if (mode == PE_MODE_SEARCH) {
            /* no fence: the readers check the histogram by its sum (pick_level1). The counter
             * only keeps the bases in step (the next call's hbase); every thread has used the
             * bases (s1) before this barrier (its predicate reads them), so none can read the
             * selector's update of them. */
            if (__syncthreads_or(s1.y == 0xFFFFFFFFu && s1.w == 0xFFFFFFFFu) && threadIdx.x == 0)
                asm volatile("" ::: "memory");
            if (threadIdx.x == 0) atomicAdd(&st->hist_done, 1u);
        } else {
            pe_signal(&st->hist_done); /* the selector advances the bases after it */
        }
    }
    /* the accumulators are zeroed while the other workers' histograms come in */
    for (int i = threadIdx.x; i < T::NT * T::ACC / 4; i += PE_THREADS)
        reinterpret_cast<float4 *>(acc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    const unsigned long long hsum = mode == PE_MODE_SEARCH ? m.total_w : 0ull;
    __syncthreads();
    unsigned long long aw = 0;
    const uint32_t known_cut = PE_INVALID; /* effort 0: nothing */
    const int b1 = pick_level1(hist, (uint32_t *)list, mode, budget, &aw, hsum);
    const bool publish = mode == PE_MODE_SEARCH; /* the selector reads the candidates */

    /* 2.-3. pass by pass: sure rows -> list -> accumulators; candidates -> own list + global
     * share, the count published with the last pass's (before its streaming). One key load per
     * pass after 1. (was three with two passes); the same lists in the same order. */
    uint32_t n_def_all = 0, n_c = 0; /* sure rows, own candidates so far */
    uint32_t n_rec = 0;              /* Q8, tile 0: dispatched records (pe_count_records) */
    const bool count_rec = Q8 && tile == 0;
    if (n_pass == 1) { /* keys still in registers. A branch of its own: one loop for every
                          pass count measured 0.7-1.9 us slower on 4096x4096 (code generation),
                          though faster at effort 1.0 on the largest shapes (README_cuda.md) */
        const uint32_t nd = split_rows(m, b1, true, true, publish, tile, local, ri, ci, xv, key,
                                       list, 0u, cand_rx, cand_k, &n_c, warp_n, s_tot, tag, true,
                                       short_from);
        pe_process<CT, Q8>(list, nd, tile_base, my, team, t);
        n_def_all += nd;
        if (count_rec) n_rec += pe_count_records(list, nd);
        __syncthreads();
    } else {
        /* With a search, every pass's candidates (and the count) go out before any streaming:
         * the selector resolves while the rows stream. Sure rows of the passes are appended to
         * one list while they fit; the passes from the first that does not (pend) stream
         * after it, keys loaded again. Without a search: pass 0 first, as below. */
        uint32_t n_list = 0;
        int pend = n_pass, visited = 0;
        for (int p = 0; p < n_pass && (publish || p == 0); p++, visited++) {
            if (p != loaded) pe_load_keys<Q8>(x, m, split, loaded = p, ri, xv, key, ci);
            const bool app = pend == n_pass;
            const uint32_t nd = split_rows(m, b1, app, true, publish, tile, local, ri, ci, xv, key,
                                           list, n_list, cand_rx, cand_k, &n_c, warp_n, s_tot,
                                           tag, p == n_pass - 1, short_from);
            if (app && (n_list == 0 || n_list + nd <= PE_PASS_ROWS)) n_list += nd;
            else if (app) pend = p;
        }
        if (pend == n_pass) pend = visited;
        pe_process<CT, Q8>(list, n_list, tile_base, my, team, t);
        n_def_all += n_list;
        if (count_rec) n_rec += pe_count_records(list, n_list);
        __syncthreads();
        for (int p = pend; p < n_pass; p++) {
            if (p != loaded) pe_load_keys<Q8>(x, m, split, loaded = p, ri, xv, key, ci);
            const uint32_t nd = split_rows(m, b1, true, p >= visited, false, tile, local, ri, ci,
                                           xv, key, list, 0u, cand_rx, cand_k, &n_c, warp_n,
                                           s_tot, tag, false, short_from);
            pe_process<CT, Q8>(list, nd, tile_base, my, team, t);
            n_def_all += nd;
            if (count_rec) n_rec += pe_count_records(list, nd);
            __syncthreads();
        }
    }

    /* 3b. the own candidates: loads issued, then the cut, then those with key >= cut */
    __shared__ uint32_t s_cut;
    auto wait_cut = [&]() -> uint32_t { /* block-wide */
        if (mode != PE_MODE_SEARCH) return known_cut; /* no search: known here */
        if (threadIdx.x == 0) s_cut = pe_poll_tag<false>(&st->cut_word, tag);
        __syncthreads();
        return s_cut;
    };
    uint32_t n_take = 0;
    if (n_c <= PE_CAND_CAP) {
        const uint32_t cut = pe_process_cands<CT, Q8>(cand_rx, cand_k, n_c, tile_base, my, team,
                                                      t, wait_cut);
        if (tile == 0)
            for (uint32_t i0 = 0; i0 < n_c; i0 += PE_THREADS) {
                const uint32_t i = i0 + threadIdx.x;
                const bool taken = i < n_c && (cand_k[i] & 0x7FFFFFFFu) >= cut;
                n_take += __syncthreads_count(taken);
                if (Q8) n_rec += __syncthreads_count(taken && (cand_rx[i].x & 3) == 0);
            }
    } else { /* more candidates than shared memory holds: scan the split's keys again */
        const uint32_t cut = wait_cut();
        for (int p = 0; p < n_pass; p++) {
            pe_load_keys<Q8>(x, m, split, p, ri, xv, key, ci);
            bool take[PE_KR];
#pragma unroll
            for (int q = 0; q < PE_KR; q++)
                take[q] = ri[q] >= 0 && (int)(key[q] >> 19) == b1 && key[q] >= cut;
            const uint32_t n = pe_compact(take, ci, xv, list, 0, warp_n[0], &s_tot[0]);
            pe_process<CT, Q8>(list, n, tile_base, my, team, t);
            n_take += n;
            if (count_rec) n_rec += pe_count_records(list, n);
            __syncthreads();
        }
    }
    __syncthreads();
    if (tile == 0 && threadIdx.x == 0) {
        atomicAdd(&st->info_rows, (unsigned long long)(n_def_all + n_take));
        if (Q8) atomicAdd(&st->info_records, (unsigned long long)n_rec);
    }

    pe_write_sums<TY, CT>(m, acc, tile, split, (TY *)s_y, tag, (float *)list); /* list: free */
}

/* ---------------------------------------------------------------- launch */

template <typename TX, typename TY, int CT, bool Q8>
static cudaError_t launch(const pe_cuda_group *g, const void *x, void *stream, int pdl, int coop,
                          pe_effort ef) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[2];
    int na = 0;
    if (coop) {
        attr[na].id = cudaLaunchAttributeCooperative;
        attr[na++].val.cooperative = 1;
    }
    if (pdl) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    cfg.gridDim = dim3((unsigned)(g->n_workers + g->n_mat));
    cfg.blockDim = dim3(PE_THREADS);
    cfg.dynamicSmemBytes = Tile<CT>::SMEM;
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = na;
    return cudaLaunchKernelEx(&cfg, k_effort<TX, TY, CT, Q8>, (const TX *)x, *g, ef);
}

extern "C" int pe_cuda_init(void) {
    return pe_status_of(pe_for_each_kind([](auto tx, auto ty, auto ct, auto q8) {
        return cudaFuncSetAttribute(k_effort<pe_type_of<decltype(tx)>, pe_type_of<decltype(ty)>,
                                             ct.value, q8.value != 0>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    Tile<ct.value>::SMEM);
    }));
}

extern "C" int pe_cuda_matmul(const pe_cuda_group *g, const void *x, int x_dtype,
                              int64_t n_tokens, const double *effort_ptr, double effort_val,
                              int effort_each, int y_dtype, void *stream, int pdl, int coop) {
    if (!pe_group_ok(g, 0) || n_tokens < 0 ||
        (effort_each != 0 && (effort_each != 1 || !effort_ptr)))
        return PE_CUDA_ERR_ARG;
    const pe_effort ef = {effort_ptr, effort_val, effort_each};
    return pe_per_token(g, x, x_dtype, y_dtype, n_tokens, [&](const pe_cuda_group *gt,
                                                               const void *xt) {
        return pe_by_kind(x_dtype, y_dtype, g->m[0].ct, g->m[0].q8,
                          [&](auto tx, auto ty, auto ct, auto q8) {
                              return launch<pe_type_of<decltype(tx)>, pe_type_of<decltype(ty)>,
                                            ct.value, q8.value != 0>(gt, xt, stream, pdl, coop,
                                                                     ef);
                          });
    });
}
