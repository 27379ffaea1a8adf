/* NEON effort matmul on the permuted copy (kernels.h, "The permuted layout"). Per input and
 * group, the rank-ordered fp16 values of the dispatched tiers are converted and multiplied by
 * x (0 for the ranks the item does not dispatch), then gathered to their 16 positions by table
 * lookups (vqtbl1q..vqtbl4q_u8) through the group's rank map: a rank past the item's tiers
 * indexes past the table and reads 0, so no blend is needed and no weight is routed alone. */
#include <arm_neon.h>

#include "layout/permwalk.h"

/* x in the lanes of ranks 4 t .. 4 t + 3 that mask dispatches, 0 in the others. */
static inline float32x4_t masked_x(uint32_t mask, float x, int t) {
    static const uint32_t bits[4] = {1, 2, 4, 8};
    uint32x4_t on = vtstq_u32(vdupq_n_u32(mask >> (PE_TIER * t)), vld1q_u32(bits));
    return vreinterpretq_f32_u32(vandq_u32(on, vreinterpretq_u32_f32(vdupq_n_f32(x))));
}

/* rank map (8 bytes) -> byte indices into the rank-ordered f32 values: vector j, byte
 * 4 l + b = 4 rank(4 j + l) + b, for positions 4 j .. 4 j + 3. */
static inline uint8x16x4_t gather_indices(const uint8_t *map) {
    static const uint8_t byte_of_lane[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    const uint8x16_t lane = vld1q_u8(byte_of_lane);
    uint8x8_t m = vld1_u8(map);
    uint8x16_t rank4 = vcombine_u8(vand_u8(vshl_n_u8(m, 2), vdup_n_u8(0x3C)), /* positions 0..7 */
                                   vand_u8(vshr_n_u8(m, 2), vdup_n_u8(0x3C))); /* 8..15 */
    uint8x16_t lo = vzip1q_u8(rank4, rank4), hi = vzip2q_u8(rank4, rank4); /* each twice */
    uint8x16x4_t idx = {{vorrq_u8(vzip1q_u8(lo, lo), lane), vorrq_u8(vzip2q_u8(lo, lo), lane),
                         vorrq_u8(vzip1q_u8(hi, hi), lane), vorrq_u8(vzip2q_u8(hi, hi), lane)}};
    return idx;
}

/* v[0..T) (ranks 0 .. 4 T - 1, f32) at the 4 positions idx names; 0 for ranks >= 4 T. */
static inline PE_INLINE float32x4_t gather(const float32x4_t v[QUARTERS], uint8x16_t idx,
                                           const int T) {
    uint8x16_t r;
    if (T == 1) {
        r = vqtbl1q_u8(vreinterpretq_u8_f32(v[0]), idx);
    } else if (T == 2) {
        uint8x16x2_t t = {{vreinterpretq_u8_f32(v[0]), vreinterpretq_u8_f32(v[1])}};
        r = vqtbl2q_u8(t, idx);
    } else if (T == 3) {
        uint8x16x3_t t = {{vreinterpretq_u8_f32(v[0]), vreinterpretq_u8_f32(v[1]),
                           vreinterpretq_u8_f32(v[2])}};
        r = vqtbl3q_u8(t, idx);
    } else {
        uint8x16x4_t t = {{vreinterpretq_u8_f32(v[0]), vreinterpretq_u8_f32(v[1]),
                           vreinterpretq_u8_f32(v[2]), vreinterpretq_u8_f32(v[3])}};
        r = vqtbl4q_u8(t, idx);
    }
    return vreinterpretq_f32_u8(r);
}

/* 4 fp16 at h -> f32. */
static inline float32x4_t load4_f16(const uint16_t *h) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

/* The batch of permwalk.h: a group's accumulators stay in registers while the items pass. */
static inline PE_INLINE void batch(const pe_item *items, int n, const int T, const int full,
                                   int64_t ng, float *acc, const batch_rows *cur,
                                   const batch_rows *nx) {
    (void)full; /* the masked x costs nothing extra here: one multiply per tier either way */
    item_rows r[MAX_BATCH];
    float32x4_t xq[MAX_BATCH][QUARTERS];
    for (int u = 0; u < n; u++) {
        r[u] = cur->r[u];
        for (int t = 0; t < T; t++) xq[u][t] = masked_x(items[u].mask, items[u].x, t);
    }
    for (int64_t g = 0; g < ng; g++) {
        if ((g & 3) == 0) prefetch_next(nx, g);
        float32x4_t a[4];
        for (int j = 0; j < 4; j++) a[j] = vld1q_f32(acc + 16 * g + 4 * j);
        for (int u = 0; u < n; u++) {
            const uint8_t *rec = r[u].rec + g * PE_PERM_REC;
            uint8x16x4_t idx = gather_indices(rec);
            float32x4_t v[QUARTERS];
            v[0] = vmulq_f32(load4_f16((const uint16_t *)(rec + 8)), xq[u][0]);
            for (int t = 1; t < QUARTERS; t++)
                v[t] = t < T ? vmulq_f32(load4_f16(r[u].tier[t] + 4 * g), xq[u][t])
                             : vdupq_n_f32(0);
            for (int j = 0; j < 4; j++) a[j] = vaddq_f32(a[j], gather(v, idx.val[j], T));
        }
        for (int j = 0; j < 4; j++) vst1q_f32(acc + 16 * g + 4 * j, a[j]);
    }
}

/* pe_items_fn on the permuted copy (permwalk.h); layout/perm_scalar.c's results within
 * float32 rounding (x * w is rounded before the add here, fused there for whole tiers). */
void pe_perm_f16_neon(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      int64_t c0, int64_t c1, float *y) {
    (void)b;
    perm_walk(p, items, begin, end, c0, c1, y);
}
