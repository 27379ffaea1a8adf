/* AVX-512 VBMI2 effort matmul on the tiered copy (kernels.h, "The tiered layout"). Per input
 * and chunk of 4 groups, each dispatched tier is placed at its positions by two word expands
 * (vpexpandw), the tiers of one input merge into one vector per group (their positions are
 * disjoint), and one convert + FMA per group adds x * w into the accumulators: no per-weight
 * routing. A partly dispatched tier keeps only the ranks the item names: the values whose
 * rank codes are not among them load as zeros (pext turns the codes into a slot mask). */
#include <immintrin.h>
#include <string.h>

#define TIER_REC PE_TIER_REC
#include "layout/tierwalk.h"

/* Tiers of one record -> the merged group pair vectors v0 (groups 0, 1), v1 (groups 2, 3). */
static inline PE_INLINE void merge_tier(const uint8_t *rec, __m512i *v0, __m512i *v1) {
    uint64_t m;
    memcpy(&m, rec, 8);
    __m512i w0 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 8)));
    __m512i w1 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 24)));
    *v0 = _mm512_mask_expand_epi16(*v0, (__mmask32)m, w0);
    *v1 = _mm512_mask_expand_epi16(*v1, (__mmask32)(m >> 32), w1);
}

/* The slots (16 bits, 4 groups x 4) whose rank code (2 bits each, codes) is in the 4-bit
 * rank set r. */
static inline PE_INLINE uint32_t kept_slots(uint32_t codes, uint32_t r) {
    uint32_t hi = (codes >> 1) & 0x55555555u, lo = codes & 0x55555555u, nh = ~hi, nl = ~lo;
    uint32_t in = ((r & 1) ? nh & nl : 0) | ((r & 2) ? nh & lo : 0) | ((r & 4) ? hi & nl : 0) |
                  ((r & 8) ? hi & lo : 0);
    return _pext_u32(in, 0x55555555u);
}

/* The same for a partly dispatched tier: the values of the slots not kept load as zeros. */
static inline PE_INLINE void merge_some(const uint8_t *rec, uint32_t codes, uint32_t r,
                                        __m512i *v0, __m512i *v1) {
    uint64_t m;
    memcpy(&m, rec, 8);
    uint32_t keep = kept_slots(codes, r);
    __m512i w0 = _mm512_castsi128_si512(_mm_maskz_loadu_epi16((__mmask8)keep, rec + 8));
    __m512i w1 = _mm512_castsi128_si512(_mm_maskz_loadu_epi16((__mmask8)(keep >> 8), rec + 24));
    *v0 = _mm512_mask_expand_epi16(*v0, (__mmask32)m, w0);
    *v1 = _mm512_mask_expand_epi16(*v1, (__mmask32)(m >> 32), w1);
}

/* The batch of tierwalk.h: per chunk, 4 accumulators in registers while the inputs pass. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = TIER_ROW(p);
    const uint8_t *rec[MAX_BATCH];
    const uint32_t *codes[MAX_BATCH];
    uint32_t mask[MAX_BATCH];
    __m512 xv[MAX_BATCH];
    for (int u = 0; u < n; u++) {
        const uint8_t *r0 = p->tiers + p->tier_off[items[u].input];
        rec[u] = r0 + cb * PE_TIER_REC;
        codes[u] = (const uint32_t *)(r0 + p->n_chunks * PE_TIER_REC) + cb; /* tier 0 */
        mask[u] = items[u].mask;
        xv[u] = _mm512_set1_ps(items[u].x);
    }
    for (int64_t c = 0; c < nc; c++) {
        float *a = acc + 64 * c;
        __m512 a0 = _mm512_load_ps(a), a1 = _mm512_load_ps(a + 16);
        __m512 a2 = _mm512_load_ps(a + 32), a3 = _mm512_load_ps(a + 48);
        for (int u = 0; u < n; u++) {
            __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
            const uint8_t *r = rec[u] + c * PE_TIER_REC;
            for (int t = 0; t < T; t++) {
                uint32_t rt = mask[u] >> (PE_TIER * t) & 15;
                if (!PARTIAL || rt == 15)
                    merge_tier(r + t * row, &v0, &v1);
                else if (rt)
                    merge_some(r + t * row, codes[u][c + t * row / 4], rt, &v0, &v1);
            }
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v0)), xv[u], a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v0, 1)), xv[u], a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v1)), xv[u], a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v1, 1)), xv[u], a3);
        }
        _mm512_store_ps(a, a0);
        _mm512_store_ps(a + 16, a1);
        _mm512_store_ps(a + 32, a2);
        _mm512_store_ps(a + 48, a3);
    }
}

/* pe_items_fn on the tiered copy (tierwalk.h); layout/tiers_scalar.c's bits. */
void pe_tiers_f16_avx512vbmi2(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                              const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                              int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_walk(p, items, begin, end, c0, c1, y);
}
