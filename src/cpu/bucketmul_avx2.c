/* AVX2 + F16C + FMA routed kernel, for matrices without a permuted copy (permmul_avx2.c). Packed
 * bucket rows: 16 values are converted and scaled in two vectors, then added into the tile's
 * 256 accumulators (L1) at their positions, one by one. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

/* acc[16 l + pos_l] += xw[l] for the 16 nibbles of pos; the shifts are independent. */
#define SC(L) acc[16 * (L) + ((pos >> (4 * (L))) & 15)] += xw[L]
#define SCATTER16(acc, pos, xw)                                                          \
    do {                                                                                 \
        SC(0); SC(1); SC(2); SC(3); SC(4); SC(5); SC(6); SC(7);                          \
        SC(8); SC(9); SC(10); SC(11); SC(12); SC(13); SC(14); SC(15);                    \
    } while (0)

/* One batch of n staged slots (strides vs, qs) on tile t: acc[16 l + pos] += x * w. */
static void batch_tile(const uint16_t *vals, const uint8_t *pos, const float *xs, int64_t n,
                       int64_t vs, int64_t qs, int64_t t, float *acc) {
    float xw[16] __attribute__((aligned(32)));
    const uint16_t *v = vals + t * PE_TILE;
    const uint8_t *q = pos + t * (PE_TILE / 2);
    for (int64_t s = 0; s < n; s++, v += vs, q += qs) {
        __m256 xv = _mm256_set1_ps(xs[s]);
        __m256i h = _mm256_loadu_si256((const __m256i *)v);
        _mm256_store_ps(xw, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), xv));
        _mm256_store_ps(xw + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), xv));
        uint64_t pos;
        memcpy(&pos, q, 8);
        SCATTER16(acc, pos, xw);
    }
}

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)): batches of runs, staged, tile by tile. */
void pe_packedmul_f16_avx2(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
                               int64_t n_runs, int64_t t0, int64_t t1, float *y) {
    static _Thread_local float acc[PE_CHUNK][256] __attribute__((aligned(64)));
    static _Thread_local uint16_t vals[PE_BATCH * PE_CHUNK * PE_TILE] __attribute__((aligned(64)));
    static _Thread_local uint8_t pos[PE_BATCH * PE_CHUNK * 8] __attribute__((aligned(64)));
    static _Thread_local float xs[PE_BATCH];
    for (int64_t c0 = t0; c0 < t1; c0 += PE_CHUNK) {
        int64_t c1 = c0 + PE_CHUNK < t1 ? c0 + PE_CHUNK : t1, nt = c1 - c0;
        memset(acc, 0, sizeof(float) * 256 * (size_t)nt);
        for (int64_t r0 = 0, r1; r0 < n_runs; r0 = r1) {
            r1 = pe_batch_end(runs, n_runs, r0);
            if (r1 < n_runs)
                pe_prefetch_batch(pk, b, runs, r1, pe_batch_end(runs, n_runs, r1), c0, c1);
            int64_t n = pe_stage(pk, b, runs, r0, r1, c0, c1, vals, pos, xs);
            for (int64_t t = 0; t < nt; t++)
                batch_tile(vals, pos, xs, n, nt * PE_TILE, nt * 8, t, acc[t]);
        }
        for (int64_t t = c0; t < c1; t++) {
            int64_t j0 = 256 * t, n = pk->n_out - j0 < 256 ? pk->n_out - j0 : 256;
            memcpy(y + j0, acc[t - c0], sizeof(float) * (size_t)n);
        }
    }
}
