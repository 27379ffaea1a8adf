/* AVX2 + F16C + FMA effort matmul on the permuted copy (the kernel of the avx2, avx512 and,
 * for matrices without a tiered copy, avx512vbmi2 sets) (kernels.h, "The permuted layout").
 * Per input and group, the rank-ordered values of the dispatched tiers are converted and
 * multiplied by x (0 for the ranks the item does not dispatch), then gathered to their 16
 * positions by lane permutes (vpermps) through the group's rank map: about 15 vector
 * operations per group and input, with no per-weight routing. */
#include <immintrin.h>

#include "layout/permwalk.h"

/* All ones in the lanes of ranks 8 h .. 8 h + 7 that mask dispatches, 0 in the others. */
static inline __m256 rank_lanes(uint32_t mask, int h) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i m = _mm256_set1_epi32((int)(mask >> (8 * h)));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(m, bit), bit));
}

/* x in the lanes of ranks 8 h .. 8 h + 7 that mask dispatches, 0 in the others. */
static inline __m256 masked_x(uint32_t mask, float x, int h) {
    return _mm256_and_ps(rank_lanes(mask, h), _mm256_set1_ps(x));
}

/* The batch of permwalk.h: a group's accumulators stay in registers while the items pass. */
static inline PE_INLINE void batch(const pe_item *items, int n, const int T, const int full,
                                   int64_t ng, float *acc, const batch_rows *cur,
                                   const batch_rows *nx) {
    item_rows r[MAX_BATCH];
    __m256 xlo[MAX_BATCH], xhi[MAX_BATCH], keep[MAX_BATCH];
    const __m256 zero = _mm256_setzero_ps();
    /* full (every rank of the T tiers) and prefix items: x multiplies after the gather (one
     * FMA per 8 outputs instead of a multiply per 8 ranks and an add); a prefix masks only its
     * last tier's half (keep: the dispatched lanes of ranks 0-7 for T <= 2, 8-15 for T >= 3) */
    for (int u = 0; u < n; u++) {
        r[u] = cur->r[u];
        xlo[u] = full ? _mm256_set1_ps(items[u].x) : masked_x(items[u].mask, items[u].x, 0);
        xhi[u] = full ? xlo[u] : masked_x(items[u].mask, items[u].x, 1);
        if (full == 2) keep[u] = rank_lanes(items[u].mask, T >= 3);
    }
    for (int64_t g = 0; g < ng; g++) {
        if ((g & 3) == 0) prefetch_next(nx, g);
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
            __m256 v = full ? _mm256_cvtph_ps(h) : _mm256_mul_ps(_mm256_cvtph_ps(h), xlo[u]);
            if (full == 2 && T <= 2) v = _mm256_and_ps(v, keep[u]);
            __m256 lo = _mm256_permutevar8x32_ps(v, map), hi = _mm256_permutevar8x32_ps(v, map_hi);
            __m256 lo2 = zero, hi2 = zero;
            if (T >= 3) {
                __m128i h2 = _mm_loadl_epi64((const __m128i *)(r[u].tier[2] + 4 * g));
                if (T == 4)
                    h2 = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(h2),
                                                       (const double *)(r[u].tier[3] + 4 * g)));
                __m256 v2 = full ? _mm256_cvtph_ps(h2) : _mm256_mul_ps(_mm256_cvtph_ps(h2), xhi[u]);
                if (full == 2) v2 = _mm256_and_ps(v2, keep[u]);
                lo2 = _mm256_permutevar8x32_ps(v2, map);
                hi2 = _mm256_permutevar8x32_ps(v2, map_hi);
            }
            if (full) {
                a0 = _mm256_fmadd_ps(_mm256_blendv_ps(lo, lo2, sel_lo), xlo[u], a0);
                a1 = _mm256_fmadd_ps(_mm256_blendv_ps(hi, hi2, sel_hi), xlo[u], a1);
            } else {
                a0 = _mm256_add_ps(a0, _mm256_blendv_ps(lo, lo2, sel_lo));
                a1 = _mm256_add_ps(a1, _mm256_blendv_ps(hi, hi2, sel_hi));
            }
        }
        _mm256_store_ps(acc + 16 * g, a0);
        _mm256_store_ps(acc + 16 * g + 8, a1);
    }
}

/* pe_items_fn on the permuted copy (permwalk.h); layout/perm_scalar.c's bits. */
void pe_perm_f16_avx2(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      int64_t c0, int64_t c1, float *y) {
    (void)b;
    perm_walk(p, items, begin, end, c0, c1, y);
}
