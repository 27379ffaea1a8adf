/* The tiered copy's scalar kernel (the walk of tierwalk.h with a plain C batch): the spec of
 * the SIMD kernels that read the tiered copy, which match it bit for bit (the same fused
 * multiply-add per output and item, items in the same order). */
#include <math.h>

#include "fp16.h"
#define TIER_REC PE_TIER_REC
#include "layout/tierwalk.h"

/* The slots (16 bits, 4 groups x 4) whose rank code (2 bits each, codes) is in the 4-bit rank
 * set r. */
static uint32_t kept_slots(uint32_t codes, uint32_t r) {
    uint32_t keep = 0;
    for (int s = 0; s < 16; s++) keep |= (r >> (codes >> (2 * s) & 3) & 1) << s;
    return keep;
}

/* The tier record rec placed at its positions in v (64 lanes: 4 groups x 16), the values of
 * the slots not in keep as zeros. */
static void merge(const uint8_t *rec, uint32_t keep, uint16_t v[64]) {
    uint64_t m;
    memcpy(&m, rec, 8);
    for (int lane = 0, s = 0; lane < 64; lane++) {
        if (!(m >> lane & 1)) continue;
        uint16_t h;
        memcpy(&h, rec + 8 + 2 * s, 2);
        v[lane] = keep >> s & 1 ? h : 0;
        s++;
    }
}

/* The batch of tierwalk.h: per chunk and input, its tiers merged into one value per output,
 * then acc[j] = fma(w_j, x, acc[j]) for all 64 outputs of the chunk. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = TIER_ROW(p);
    for (int64_t c = cb; c < cb + nc; c++) {
        float *a = acc + 64 * (c - cb);
        for (int u = 0; u < n; u++) {
            const uint8_t *r0 = p->tiers + p->tier_off[items[u].input];
            uint16_t v[64] = {0};
            for (int t = 0; t < T; t++) {
                uint32_t rt = items[u].mask >> (PE_TIER * t) & 15, codes;
                memcpy(&codes, r0 + t * row + p->n_chunks * PE_TIER_REC + 4 * c, 4);
                if (!PARTIAL || rt == 15) merge(r0 + t * row + c * PE_TIER_REC, 0xFFFF, v);
                else if (rt) merge(r0 + t * row + c * PE_TIER_REC, kept_slots(codes, rt), v);
            }
            for (int j = 0; j < 64; j++) a[j] = fmaf(pe_f16_to_f32(v[j]), items[u].x, a[j]);
        }
    }
}

void pe_tiers_f16_scalar(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                         const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                         int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_walk(p, items, begin, end, c0, c1, y);
}
