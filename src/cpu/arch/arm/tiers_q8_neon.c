/* NEON effort matmul on the tiered copy's int8 values (kernels.h, "The tiered layout", q8).
 * NEON has no expand: per group of a record, its 4 int8 values (repeated over a vector) are
 * placed at the group's 16 positions by one table lookup (vqtbl1q_u8) whose indices come from
 * two 2 KiB tables indexed by the bytes of the group's position mask (tiershuffle.h; an empty
 * position indexes past the table and reads 0), then widened to f32 and added with x * scale
 * (once per record) by 4 FMAs. Per record (16 multiplications): 26 bytes read (1.625 per
 * multiplication) and 4 x (dup, 2 table loads, lookup, 6 widens, 4 converts, 4 FMAs) + 2 =
 * about 74 vector instructions, 4.6 per multiplication (128-bit vectors: 16 outputs are 4
 * FMAs per group and tier). A partly dispatched tier zeroes the values whose rank codes are
 * not kept (a byte mask on the 4 values). */
#include <arm_neon.h>
#include <string.h>

#include "fp16.h"
#define TIER_REC PE_TIER_REC_Q8
#include "layout/tiershuffle.h"
#include "layout/tierwalk.h"

/* 4 bits -> 4 bytes, 0xFF where the bit is set. */
static inline uint32_t byte_mask(uint32_t bits4) {
    return ((bits4 * 0x00204081u) & 0x01010101u) * 0xFFu;
}

/* 4 int16 -> 4 f32. */
static inline float32x4_t f32_of(int16x4_t h) { return vcvtq_f32_s32(vmovl_s16(h)); }

/* The record rec (its slots in keep) of one tier, x: a[j] = fma(q_j, x * scale, a[j]) over the
 * chunk's 64 outputs, 4 per accumulator (q = 0 where the tier has no value). */
static inline PE_INLINE void tier_fma(const uint8_t *rec, uint32_t keep, const int PARTIAL,
                                      float x, float32x4_t a[16]) {
    uint16_t s;
    memcpy(&s, rec + 24, 2);
    float32x4_t xs = vdupq_n_f32(x * pe_f16_to_f32(s));
    for (int g = 0; g < 4; g++) {
        uint32_t v4;
        memcpy(&v4, rec + 8 + 4 * g, 4);
        if (PARTIAL) v4 &= byte_mask(keep >> (4 * g) & 15);
        uint8x16_t idx = vcombine_u8(vld1_u8(slot_lo[rec[2 * g]]), vld1_u8(slot_hi[rec[2 * g + 1]]));
        int8x16_t q = vreinterpretq_s8_u8(vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(v4)), idx));
        int16x8_t h0 = vmovl_s8(vget_low_s8(q)), h1 = vmovl_high_s8(q);
        a[4 * g] = vfmaq_f32(a[4 * g], f32_of(vget_low_s16(h0)), xs);
        a[4 * g + 1] = vfmaq_f32(a[4 * g + 1], f32_of(vget_high_s16(h0)), xs);
        a[4 * g + 2] = vfmaq_f32(a[4 * g + 2], f32_of(vget_low_s16(h1)), xs);
        a[4 * g + 3] = vfmaq_f32(a[4 * g + 3], f32_of(vget_high_s16(h1)), xs);
    }
}

#define ACC_T float32x4_t
#define ACC_N 16
#define ACC_LOAD(p) vld1q_f32(p)
#define ACC_STORE(p, v) vst1q_f32(p, v)
#include "layout/tiers_q8_batch.h"

/* pe_items_fn on the q8 tiered copy (tierwalk.h); layout/tiers_q8_scalar.c's bits. */
void pe_tiers_q8_neon(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_slots_ready();
    tier_walk(p, items, begin, end, c0, c1, y);
}
