/* The batch of tierwalk.h for the q8 tiered copy, shared by the kernels that keep a chunk's 64
 * accumulators in ACC_N vector registers of type ACC_T (AVX2: 8 x __m256, NEON: 16 x
 * float32x4_t). The including file defines ACC_T, ACC_N, ACC_LOAD(p), ACC_STORE(p, v) and
 *   static inline PE_INLINE void tier_fma(const uint8_t *rec, uint32_t keep, const int PARTIAL,
 *                                         float x, ACC_T a[ACC_N]);
 * (one tier's record, its kept slots: a += q * (x * scale)) before including it, after
 * tierwalk.h. */
#ifndef PE_TIERS_Q8_BATCH_H
#define PE_TIERS_Q8_BATCH_H

/* Per chunk, the accumulators in registers while the inputs pass, tiers in order. */
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
        ACC_T a[ACC_N];
        for (int j = 0; j < ACC_N; j++) a[j] = ACC_LOAD(out + 64 / ACC_N * j);
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
        for (int j = 0; j < ACC_N; j++) ACC_STORE(out + 64 / ACC_N * j, a[j]);
    }
}
#endif
