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

#define ACC_T __m256
#define ACC_N 8
#define ACC_LOAD(p) _mm256_load_ps(p)
#define ACC_STORE(p, v) _mm256_store_ps(p, v)
#include "layout/tiers_q8_batch.h"

/* pe_items_fn on the q8 tiered copy (tierwalk.h); layout/tiers_q8_scalar.c's bits. */
void pe_tiers_q8_avx2(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_slots_ready();
    tier_walk(p, items, begin, end, c0, c1, y);
}
