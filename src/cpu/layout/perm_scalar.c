/* The permuted copy's scalar kernel (the walk of permwalk.h with a plain C batch): the spec of
 * the SIMD kernels that read the permuted copy. AVX2 matches it bit for bit (the same
 * operations per output and item: a fused multiply-add where the item dispatches whole tiers
 * or a prefix of ranks, else x * w rounded, then added); NEON rounds x * w before the add for
 * every item, so it matches within float32 rounding. */
#include <math.h>

#include "fp16.h"
#include "layout/permwalk.h"

/* The batch of permwalk.h: per group and input, each position's rank through the rank map,
 * its value if the rank lies in the item's T tiers (0 past them), then the add. */
static inline PE_INLINE void batch(const pe_item *items, int n, const int T, const int full,
                                   int64_t ng, float *acc, const batch_rows *cur,
                                   const batch_rows *nx) {
    for (int64_t g = 0; g < ng; g++) {
        if ((g & 3) == 0) prefetch_next(nx, g);
        float *a = acc + 16 * g;
        for (int u = 0; u < n; u++) {
            const uint8_t *rec = cur->r[u].rec + g * PE_PERM_REC;
            uint16_t h[PE_RANKS] = {0}; /* rank-ordered values of the T tiers */
            memcpy(h, rec + 8, 2 * PE_TIER);
            for (int t = 1; t < T; t++) memcpy(h + PE_TIER * t, cur->r[u].tier[t] + 4 * g, 8);
            uint32_t mask = items[u].mask;
            float x = items[u].x;
            for (int pos = 0; pos < PE_GROUP; pos++) {
                int k = rec[pos & 7] >> (pos & 8 ? 4 : 0) & 15, on = mask >> k & 1;
                float w = pe_f16_to_f32(h[k]);
                if (full) a[pos] = fmaf(on ? w : 0.0f, x, a[pos]);
                else a[pos] = a[pos] + w * (on ? x : 0.0f);
            }
        }
    }
}

void pe_perm_f16_scalar(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                        const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                        int64_t c0, int64_t c1, float *y) {
    (void)b;
    perm_walk(p, items, begin, end, c0, c1, y);
}
