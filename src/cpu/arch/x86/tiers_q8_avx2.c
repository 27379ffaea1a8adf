/* AVX2 + F16C + FMA effort matmul on the tiered copy's int8 values (kernels.h, "The tiered
 * layout", q8; the kernel of the avx2 and avx512 sets for q8 matrices). AVX2 has no expand:
 * per group of a record, its 4 int8 values are widened to f32 in lanes 0..3 (lanes 4..7 zero)
 * and placed at the group's 16 positions by two lane permutes (vpermps) whose indices come
 * from two 2 KiB tables indexed by the bytes of the group's position mask (tiershuffle.h); then
 * two FMAs with x * scale (once per record). Per record (16 multiplications): 26 bytes read
 * (1.625 per multiplication: the canonical q8 bytes, no per-group rank map) and 4 x (load,
 * sign extend, convert, 2 table loads with zero extend, 2 permutes, 2 FMAs) + 3 (scale convert,
 * multiply, broadcast) = 39 vector instructions, about 2.4 per multiplication, plus 2 byte
 * loads per group for the table indices. A partly dispatched tier zeroes the values whose rank
 * codes are not kept (a byte mask on the 4 values). */
#include <immintrin.h>
#include <string.h>

#define TIER_REC PE_TIER_REC_Q8
#include "layout/tiershuffle.h"
#include "layout/tierwalk.h"

/* 4 bits -> 4 bytes, 0xFF where the bit is set. */
static inline uint32_t byte_mask(uint32_t bits4) {
    return ((bits4 * 0x00204081u) & 0x01010101u) * 0xFFu;
}

/* The record rec (its slots in keep) of one tier, x: a[j] = fma(q_j, x * scale, a[j]) over the
 * chunk's 64 outputs, 8 per accumulator (q = 0 where the tier has no value). */
static inline PE_INLINE void tier_fma(const uint8_t *rec, uint32_t keep, const int PARTIAL,
                                      float x, __m256 a[8]) {
    uint16_t s;
    memcpy(&s, rec + 24, 2);
    __m256 xs = _mm256_set1_ps(x * _cvtsh_ss(s));
    for (int g = 0; g < 4; g++) {
        uint32_t v4;
        memcpy(&v4, rec + 8 + 4 * g, 4);
        if (PARTIAL) v4 &= byte_mask(keep >> (4 * g) & 15);
        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi32_si128((int)v4)));
        __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)slot_lo[rec[2 * g]]));
        __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)slot_hi[rec[2 * g + 1]]));
        a[2 * g] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(q, lo), xs, a[2 * g]);
        a[2 * g + 1] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(q, hi), xs, a[2 * g + 1]);
    }
}

/* The batch of tierwalk.h: per chunk, 8 accumulators in registers while the inputs pass. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = TIER_ROW(p);
    const uint8_t *rec[MAX_BATCH], *codes[MAX_BATCH];
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
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_load_ps(out + 8 * j);
        for (int u = 0; u < n; u++) {
            const uint8_t *r = rec[u] + c * TIER_REC;
            for (int t = 0; t < T; t++) {
                uint32_t rt = mask[u] >> (PE_TIER * t) & 15;
                if (!PARTIAL || rt == 15) {
                    tier_fma(r + t * row, 0xFFFF, 0, x[u], a);
                } else if (rt) {
                    uint32_t code;
                    memcpy(&code, codes[u] + t * row + 4 * c, 4);
                    tier_fma(r + t * row, pe_kept_slots(code, rt), 1, x[u], a);
                }
            }
        }
        for (int j = 0; j < 8; j++) _mm256_store_ps(out + 8 * j, a[j]);
    }
}

/* pe_items_fn on the q8 tiered copy (tierwalk.h); layout/tiers_q8_scalar.c's bits. */
void pe_tiers_q8_avx2(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_slots_ready();
    tier_walk(p, items, begin, end, c0, c1, y);
}
