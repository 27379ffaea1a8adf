/* AVX2 + F16C + FMA effort matmul on the permuted copy (kernels.h, "The permuted layout").
 * Per input and group, the rank-ordered values of the dispatched tiers are converted and
 * multiplied by x (0 for the ranks the item does not dispatch), then gathered to their 16
 * positions by lane permutes (vpermps) through the group's rank map: about 15 vector
 * operations per group and input, with no per-weight routing. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

void pe_dense_f16_avx2(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                       const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);
void pe_packedmul_f16_avx2(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
                           int64_t n_runs, int64_t t0, int64_t t1, float *y);

#define INLINE __attribute__((always_inline)) /* T constant: the tier loads unroll */
#define BLOCK 1024    /* groups per pass over the accumulators: 64 KiB (L2) */
#define MAX_BATCH 8
#define PF_HEAD 4096  /* bytes of each row of the next batch prefetched */
#define PF_ALL_MAX (2 << 20)

/* Inputs per batch for T tiers: about 8 row streams at once (the prefetchers' reach). */
static const int batch_size[PE_RANKS / PE_TIER + 1] = {0, 8, 4, 3, 2};

/* x in the lanes of ranks 8 h .. 8 h + 7 that mask dispatches, 0 in the others. */
static inline __m256 masked_x(uint32_t mask, float x, int h) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i m = _mm256_set1_epi32((int)(mask >> (8 * h)));
    __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(m, bit), bit);
    return _mm256_and_ps(_mm256_castsi256_ps(on), _mm256_set1_ps(x));
}

/* Group row bases of item u: its records, and tier rows 1.. (4 fp16 per group each). */
typedef struct {
    const uint8_t *rec;
    const uint16_t *tier[PE_RANKS / PE_TIER];
} item_rows;

static inline item_rows rows_of(const pe_packed *p, const pe_item *it, int64_t g0) {
    const uint8_t *base = p->perm + p->perm_off[it->input];
    const uint16_t *t1 = (const uint16_t *)(base + p->n_groups * PE_PERM_REC);
    item_rows r = {base + g0 * PE_PERM_REC, {NULL}};
    for (int t = 1; t < PE_RANKS / PE_TIER; t++)
        r.tier[t] = t1 + ((t - 1) * p->n_groups + g0) * PE_TIER;
    return r;
}

/* acc[16 g + j] += x_u * w for the n items (T tiers each) over groups [g0, g0 + ng), items
 * added in order; the accumulators of a group stay in registers while the items pass. */
static inline INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                int64_t g0, int64_t ng, float *acc) {
    item_rows r[MAX_BATCH];
    __m256 xlo[MAX_BATCH], xhi[MAX_BATCH];
    const __m256 zero = _mm256_setzero_ps();
    for (int u = 0; u < n; u++) {
        r[u] = rows_of(p, items + u, g0);
        xlo[u] = masked_x(items[u].mask, items[u].x, 0);
        xhi[u] = masked_x(items[u].mask, items[u].x, 1);
    }
    for (int64_t g = 0; g < ng; g++) {
        __m256 a0 = _mm256_load_ps(acc + 16 * g), a1 = _mm256_load_ps(acc + 16 * g + 8);
        for (int u = 0; u < n; u++) {
            const uint8_t *rec = r[u].rec + g * PE_PERM_REC;
            __m256i map = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)rec));
            __m256i map_hi = _mm256_srli_epi32(map, 4);       /* ranks of positions 8..15 */
            __m256 sel_lo = _mm256_castsi256_ps(_mm256_slli_epi32(map, 28)); /* rank >= 8 */
            __m256 sel_hi = _mm256_castsi256_ps(_mm256_slli_epi32(map, 24));
            __m128i h = _mm_loadl_epi64((const __m128i *)(rec + 8)); /* ranks 0..3 */
            if (T >= 2)
                h = _mm_castpd_si128(
                    _mm_loadh_pd(_mm_castsi128_pd(h), (const double *)(r[u].tier[1] + 4 * g)));
            __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), xlo[u]);
            __m256 lo = _mm256_permutevar8x32_ps(v, map), hi = _mm256_permutevar8x32_ps(v, map_hi);
            __m256 lo2 = zero, hi2 = zero;
            if (T >= 3) {
                __m128i h2 = _mm_loadl_epi64((const __m128i *)(r[u].tier[2] + 4 * g));
                if (T == 4)
                    h2 = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(h2),
                                                       (const double *)(r[u].tier[3] + 4 * g)));
                __m256 v2 = _mm256_mul_ps(_mm256_cvtph_ps(h2), xhi[u]);
                lo2 = _mm256_permutevar8x32_ps(v2, map);
                hi2 = _mm256_permutevar8x32_ps(v2, map_hi);
            }
            a0 = _mm256_add_ps(a0, _mm256_blendv_ps(lo, lo2, sel_lo));
            a1 = _mm256_add_ps(a1, _mm256_blendv_ps(hi, hi2, sel_hi));
        }
        _mm256_store_ps(acc + 16 * g, a0);
        _mm256_store_ps(acc + 16 * g + 8, a1);
    }
}

/* Prefetches into L2 the first PF_HEAD bytes of each row of items[0, n) from group g0 on:
 * a batch starts cold streams that the hardware prefetchers take a while to pick up. */
static void prefetch_rows(const pe_packed *p, const pe_item *items, int64_t n, int T, int64_t g0,
                          int64_t ng, int64_t limit) {
    for (int64_t u = 0; u < n; u++) {
        item_rows r = rows_of(p, items + u, g0);
        int64_t len = ng * PE_PERM_REC < limit ? ng * PE_PERM_REC : limit;
        for (int64_t o = 0; o < len; o += 64) __builtin_prefetch(r.rec + o, 0, 2);
        len = ng * 2 * PE_TIER < limit ? ng * 2 * PE_TIER : limit;
        for (int t = 1; t < T; t++)
            for (int64_t o = 0; o < len; o += 64)
                __builtin_prefetch((const char *)r.tier[t] + o, 0, 2);
    }
}

/* All items of class cl (T = cl / 2 + 1 tiers) in batches. */
static void run_class(const pe_packed *p, const pe_item *items, int64_t n, int cl, int64_t g0,
                      int64_t ng, float *acc) {
    const int T = cl / 2 + 1, bs = batch_size[T];
    for (int64_t s = 0; s < n; s += bs) {
        int m = n - s < bs ? (int)(n - s) : bs;
        if (n - s > bs)
            prefetch_rows(p, items + s + bs, n - s - bs < bs ? n - s - bs : bs, T, g0, ng, PF_HEAD);
        switch (T) { /* constant T: the tier loads unroll */
        case 1: batch(p, items + s, m, 1, g0, ng, acc); break;
        case 2: batch(p, items + s, m, 2, g0, ng, acc); break;
        case 3: batch(p, items + s, m, 3, g0, ng, acc); break;
        default: batch(p, items + s, m, 4, g0, ng, acc); break;
        }
    }
}

/* Rows of a small job (up to PF_ALL_MAX bytes) all prefetched up front: cold, each batch of a
 * small matrix would otherwise wait on DRAM for its short rows. */
static void prefetch_all(const pe_packed *p, const pe_item *items,
                         const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                         int64_t g0, int64_t ng) {
    int64_t total = 0;
    for (int cl = 0; cl < PE_CLASSES; cl++)
        total += (end[cl] - begin[cl]) * (PE_PERM_REC + cl / 2 * 2 * PE_TIER) * ng;
    if (total > PF_ALL_MAX) return;
    for (int cl = 0; cl < PE_CLASSES; cl++)
        prefetch_rows(p, items + begin[cl], end[cl] - begin[cl], cl / 2 + 1, g0, ng, INT64_MAX);
}

/* This thread's accumulator block (a call: no TLS address lookup inside the walk). */
static __attribute__((noinline)) float *accumulators(void) {
    static _Thread_local float acc[BLOCK * PE_GROUP] __attribute__((aligned(64)));
    return acc;
}

/* The pe_tiermul_fn on the permuted copy: chunks [c0, c1) (4 groups each) in blocks. */
static void permmul_f16_avx2(const pe_packed *p, const pe_item *items,
                             const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                             int64_t c0, int64_t c1, float *y) {
    float *acc = accumulators();
    int64_t g_end = 4 * c1 < p->n_groups ? 4 * c1 : p->n_groups;
    prefetch_all(p, items, begin, end, 4 * c0, g_end - 4 * c0);
    for (int64_t g0 = 4 * c0; g0 < g_end; g0 += BLOCK) {
        int64_t ng = g_end - g0 < BLOCK ? g_end - g0 : BLOCK;
        memset(acc, 0, sizeof(float) * PE_GROUP * (size_t)ng);
        for (int cl = 0; cl < PE_CLASSES; cl++)
            run_class(p, items + begin[cl], end[cl] - begin[cl], cl, g0, ng, acc);
        int64_t j0 = PE_GROUP * g0, m = p->n_out - j0 < PE_GROUP * ng ? p->n_out - j0 : PE_GROUP * ng;
        memcpy(y + j0, acc, sizeof(float) * (size_t)m);
    }
}

/* The routed kernel stays for matrices without a permuted copy (repeated positions). */
const pe_cpu_kernels pe_kernels_avx2 = {"avx2", NULL, pe_packedmul_f16_avx2, pe_dense_f16_avx2,
                                        NULL, permmul_f16_avx2};
