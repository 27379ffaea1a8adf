/* The portable scalar effort matmuls, the C-level spec: the canonical rows (fp16 values, or
 * int8 values and their scales: weight = q * scale, exact in float32) read through the
 * input-major index. reference.py sums in another order (float64), so they agree within float32
 * rounding (tests/test_kernels.py: 2e-6 of the largest output). */
#include <string.h>

#include "fp16.h"
#include "kernels.h"

#define BLOCK 256 /* groups per accumulator block: 256 * 16 floats = 16 KiB */

/* For each item (by class, in order), each rank k of its mask (in rank order): acc[16 g +
 * position] += x * w over the groups of chunks [c0, c1); w the fp16 value, or (q8) the int8
 * value times the scale of tier k / 4 and chunk g / 4. */
static void canonical(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                      const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES], int64_t c0,
                      int64_t c1, float *y, const int q8) {
    float acc[BLOCK * PE_GROUP];
    int64_t G = b->n_groups, pstride = (G + 1) / 2, g_end = 4 * c1 < G ? 4 * c1 : G;
    for (int64_t gb = 4 * c0; gb < g_end; gb += BLOCK) {
        int64_t ge = gb + BLOCK < g_end ? gb + BLOCK : g_end;
        memset(acc, 0, sizeof acc);
        for (int cl = 0; cl < PE_CLASSES; cl++)
            for (int64_t u = begin[cl]; u < end[cl]; u++) {
                int32_t i = items[u].input;
                const int32_t *rows = p->row + p->slot0[i];
                float x = items[u].x;
                for (uint32_t mask = items[u].mask; mask; mask &= mask - 1) {
                    int k = __builtin_ctz(mask);
                    int64_t r = rows[k];
                    const uint8_t *q = b->positions + r * pstride;
                    if (!q8) {
                        const uint16_t *v = (const uint16_t *)b->values + r * G;
                        for (int64_t g = gb; g < ge; g++)
                            acc[(g - gb) * PE_GROUP + pe_position(q, g)] += x * pe_f16_to_f32(v[g]);
                        continue;
                    }
                    const int8_t *v = (const int8_t *)b->values + r * G;
                    const uint16_t *s = b->scales + p->scale_row[4 * i + k / PE_TIER] * p->n_chunks;
                    for (int64_t g = gb; g < ge; g++) {
                        float w = (float)v[g] * pe_f16_to_f32(s[g / 4]);
                        acc[(g - gb) * PE_GROUP + pe_position(q, g)] += x * w;
                    }
                }
            }
        int64_t j0 = gb * PE_GROUP, j1 = ge * PE_GROUP < b->n_out ? ge * PE_GROUP : b->n_out;
        memcpy(y + j0, acc, sizeof(float) * (size_t)(j1 - j0));
    }
}

/* pe_items_fn on the canonical fp16 rows. */
void pe_bucketmul_f16_scalar(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                             const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                             int64_t c0, int64_t c1, float *y) {
    canonical(p, b, items, begin, end, c0, c1, y, 0);
}

/* pe_items_fn on the canonical int8 rows and their scales. */
void pe_bucketmul_q8_scalar(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                            const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                            int64_t c0, int64_t c1, float *y) {
    canonical(p, b, items, begin, end, c0, c1, y, 1);
}
