/* AVX-512 VBMI2 effort matmul on the tiered copy's int8 values (kernels.h, "The tiered
 * layout", q8). Per input, dispatched tier and chunk of 4 groups: one byte expand (vpexpandb)
 * places the record's 16 int8 values at their positions among the chunk's 64 outputs, as
 * vpexpandw places fp16 words; x * scale once per record; then per 16 outputs a sign extend,
 * a convert and an FMA. Per record (16 multiplications): 26 bytes read (1.625 per
 * multiplication), about 20 vector instructions (load, expand, 3 lane extracts, 4 x (extend,
 * convert, FMA), scale convert, multiply, broadcast), 8 of them 512-bit shuffles (expand,
 * extracts, extends: on Zen 4 these bind, one per cycle). An item of T >= 2 tiers merges its
 * tiers' bytes (merge-expands) and their x * scale lanes (4 masked moves per tier) and then
 * converts and FMAs once: 2 + 4 + 4 per further tier instead of 20. A partly dispatched tier
 * loads the values whose rank codes are not kept as zeros (pext turns the codes into a slot
 * mask). */
#include <immintrin.h>
#include <string.h>

#define TIER_REC PE_TIER_REC_Q8
#include "layout/tierwalk.h"

/* The slots (16 bits, 4 groups x 4) whose rank code (2 bits each, codes) is in the 4-bit
 * rank set r. */
static inline PE_INLINE uint32_t kept_slots(uint32_t codes, uint32_t r) {
    uint32_t hi = (codes >> 1) & 0x55555555u, lo = codes & 0x55555555u, nh = ~hi, nl = ~lo;
    uint32_t in = ((r & 1) ? nh & nl : 0) | ((r & 2) ? nh & lo : 0) | ((r & 4) ? hi & nl : 0) |
                  ((r & 8) ? hi & lo : 0);
    return _pext_u32(in, 0x55555555u);
}

/* 16 int8 (a 128-bit lane) -> 16 f32. */
static inline PE_INLINE __m512 q_ps(__m128i q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}

/* The record rec (its slots in keep) of one tier, x: a[j] = fma(q_j, x * scale, a[j]) over the
 * chunk's 64 outputs (q = 0 where the tier has no value). */
static inline PE_INLINE void tier_fma(const uint8_t *rec, uint32_t keep, const int PARTIAL,
                                      float x, __m512 a[4]) {
    uint64_t m;
    uint16_t s;
    memcpy(&m, rec, 8);
    memcpy(&s, rec + 24, 2);
    __m128i w = PARTIAL ? _mm_maskz_loadu_epi8((__mmask16)keep, rec + 8)
                        : _mm_loadu_si128((const __m128i *)(rec + 8));
    __m512i v = _mm512_maskz_expand_epi8((__mmask64)m, _mm512_castsi128_si512(w));
    __m512 xs = _mm512_set1_ps(x * _cvtsh_ss(s));
    a[0] = _mm512_fmadd_ps(q_ps(_mm512_castsi512_si128(v)), xs, a[0]);
    a[1] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 1)), xs, a[1]);
    a[2] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 2)), xs, a[2]);
    a[3] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 3)), xs, a[3]);
}

/* The record rec (its slots in keep) of one tier of a multi-tier item, x, merged into v (its
 * int8 values at their positions) and s (x * scale at those positions, 4 x 16 lanes): the
 * tiers of an input hold disjoint positions, so one convert and FMA per 16 outputs serves
 * them all. */
static inline PE_INLINE void tier_merge(const uint8_t *rec, uint32_t keep, const int PARTIAL,
                                        float x, __m512i *v, __m512 s[4]) {
    uint64_t m;
    uint16_t sc;
    memcpy(&m, rec, 8);
    memcpy(&sc, rec + 24, 2);
    __m128i w = PARTIAL ? _mm_maskz_loadu_epi8((__mmask16)keep, rec + 8)
                        : _mm_loadu_si128((const __m128i *)(rec + 8));
    *v = _mm512_mask_expand_epi8(*v, (__mmask64)m, _mm512_castsi128_si512(w));
    __m512 xs = _mm512_set1_ps(x * _cvtsh_ss(sc));
    for (int g = 0; g < 4; g++) s[g] = _mm512_mask_mov_ps(s[g], (__mmask16)(m >> (16 * g)), xs);
}

/* An item of T >= 2 tiers: its dispatched tiers merged (tier_merge), then a[j] = fma(q_j, s_j,
 * a[j]): the bits of one FMA per tier (the others add q = 0 to an accumulator that is never
 * -0), with 4 converts and FMAs per input and chunk instead of 4 per tier. */
static inline PE_INLINE void item_fma(const uint8_t *r, const uint8_t *codes, int64_t row,
                                      uint32_t mask, float x, const int T, const int PARTIAL,
                                      __m512 a[4]) {
    __m512i v = _mm512_setzero_si512();
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    for (int t = 0; t < T; t++) {
        uint32_t rt = mask >> (PE_TIER * t) & 15;
        if (!PARTIAL || rt == 15) {
            tier_merge(r + t * row, 0xFFFF, 0, x, &v, s);
        } else if (rt) {
            uint32_t code;
            memcpy(&code, codes + t * row, 4);
            tier_merge(r + t * row, kept_slots(code, rt), 1, x, &v, s);
        }
    }
    a[0] = _mm512_fmadd_ps(q_ps(_mm512_castsi512_si128(v)), s[0], a[0]);
    a[1] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 1)), s[1], a[1]);
    a[2] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 2)), s[2], a[2]);
    a[3] = _mm512_fmadd_ps(q_ps(_mm512_extracti32x4_epi32(v, 3)), s[3], a[3]);
}

/* The batch of tierwalk.h: per chunk, 4 accumulators in registers while the inputs pass. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = TIER_ROW(p);
    const uint8_t *rec[MAX_BATCH];
    const uint8_t *codes[MAX_BATCH];
    uint32_t mask[MAX_BATCH];
    float x[MAX_BATCH];
    for (int u = 0; u < n; u++) {
        const uint8_t *r0 = p->tiers + p->tier_off[items[u].input];
        rec[u] = r0 + cb * TIER_REC;
        codes[u] = r0 + p->n_chunks * TIER_REC + 4 * cb; /* tier 0's, from chunk cb */
        mask[u] = items[u].mask;
        x[u] = items[u].x;
    }
    for (int64_t c = 0; c < nc; c++) {
        float *out = acc + 64 * c;
        __m512 a[4] = {_mm512_load_ps(out), _mm512_load_ps(out + 16), _mm512_load_ps(out + 32),
                       _mm512_load_ps(out + 48)};
        for (int u = 0; u < n; u++) {
            const uint8_t *r = rec[u] + c * TIER_REC;
            if (T >= 2) {
                item_fma(r, codes[u] + 4 * c, row, mask[u], x[u], T, PARTIAL, a);
                continue;
            }
            for (int t = 0; t < T; t++) {
                uint32_t rt = mask[u] >> (PE_TIER * t) & 15;
                if (!PARTIAL || rt == 15)
                    tier_fma(r + t * row, 0xFFFF, 0, x[u], a);
                else if (rt) {
                    uint32_t code;
                    memcpy(&code, codes[u] + t * row + 4 * c, 4);
                    tier_fma(r + t * row, kept_slots(code, rt), 1, x[u], a);
                }
            }
        }
        for (int j = 0; j < 4; j++) _mm512_store_ps(out + 16 * j, a[j]);
    }
}

/* pe_items_fn on the q8 tiered copy (tierwalk.h); layout/tiers_q8_scalar.c's bits. */
void pe_tiers_q8_avx512vbmi2(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                             const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                             int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_walk(p, items, begin, end, c0, c1, y);
}
