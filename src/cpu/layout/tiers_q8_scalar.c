/* The tiered copy's scalar kernel for int8 values (q8; the walk of tierwalk.h with a plain C
 * batch): the spec of the SIMD kernels that read the q8 tiered copy, which match it bit for bit
 * (per record x * scale once, then the same fused multiply-add per output, tier and item, in
 * the same order; a lane the tier leaves empty adds q = 0, which leaves the accumulator alone:
 * it starts at +0 and is never -0, so a SIMD kernel may also skip such adds or merge the tiers
 * of an input into one FMA per lane). */
#include <math.h>

#include "fp16.h"
#define TIER_REC PE_TIER_REC_Q8
#include "layout/tierwalk.h"

/* The q8 record rec placed at its positions in v (64 lanes: 4 groups x 16), the slots not in
 * keep as zeros. */
static void place(const uint8_t *rec, uint32_t keep, int8_t v[64]) {
    uint64_t m;
    memcpy(&m, rec, 8);
    for (int lane = 0, s = 0; lane < 64; lane++) {
        if (!(m >> lane & 1)) continue;
        v[lane] = keep >> s & 1 ? (int8_t)rec[8 + s] : 0;
        s++;
    }
}

/* The batch of tierwalk.h: per chunk, input and dispatched tier, xs = x * scale, then
 * acc[j] = fma(q_j, xs, acc[j]) for all 64 outputs of the chunk. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = TIER_ROW(p);
    for (int64_t c = cb; c < cb + nc; c++) {
        float *a = acc + 64 * (c - cb);
        for (int u = 0; u < n; u++) {
            const uint8_t *r0 = p->tiers + p->tier_off[items[u].input];
            for (int t = 0; t < T; t++) {
                const uint8_t *rec = r0 + t * row + c * TIER_REC;
                uint32_t rt = items[u].mask >> (PE_TIER * t) & 15, codes, keep = 0xFFFF;
                uint16_t s;
                if (PARTIAL && rt != 15) {
                    if (!rt) continue;
                    memcpy(&codes, r0 + t * row + p->n_chunks * TIER_REC + 4 * c, 4);
                    keep = pe_kept_slots(codes, rt);
                }
                memcpy(&s, rec + 24, 2);
                float xs = items[u].x * pe_f16_to_f32(s);
                int8_t v[64] = {0};
                place(rec, keep, v);
                for (int j = 0; j < 64; j++) a[j] = fmaf((float)v[j], xs, a[j]);
            }
        }
    }
}

void pe_tiers_q8_scalar(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                        const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                        int64_t c0, int64_t c1, float *y) {
    (void)b;
    tier_walk(p, items, begin, end, c0, c1, y);
}
