/* AVX2 + F16C + FMA kernels. Packed bucket rows: 16 values are converted and scaled in two
 * vectors, then added into the tile's 256 accumulators (L1) at their positions, one by one. */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

void pe_dense_f16_avx2(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                       const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)), tile by tile; sums in run order. */
static void packedmul_f16_avx2(const pe_packed *pk, const pe_run *runs, int64_t n_runs,
                               int64_t t0, int64_t t1, float *y) {
    float acc[256] __attribute__((aligned(32))), xw[16] __attribute__((aligned(32)));
    for (int64_t t = t0; t < t1; t++) {
        memset(acc, 0, sizeof acc);
        const uint16_t *vt = pk->values + t * pk->n_slots * PE_TILE;
        const uint8_t *qt = pk->pos + t * pk->n_slots * (PE_TILE / 2);
        for (int64_t r = 0; r < n_runs; r++) {
            __m256 xv = _mm256_set1_ps(runs[r].x);
            const uint16_t *v = vt + (int64_t)runs[r].slot * PE_TILE;
            const uint8_t *q = qt + (int64_t)runs[r].slot * (PE_TILE / 2);
            for (int s = 0; s < runs[r].n; s++, v += PE_TILE, q += PE_TILE / 2) {
                __m256i h = _mm256_load_si256((const __m256i *)v);
                _mm256_store_ps(xw, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), xv));
                _mm256_store_ps(xw + 8,
                                _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), xv));
                uint64_t pos;
                memcpy(&pos, q, 8);
                for (int l = 0; l < 16; l++, pos >>= 4) acc[16 * l + (pos & 15)] += xw[l];
            }
        }
        int64_t j0 = 256 * t, n = pk->n_out - j0 < 256 ? pk->n_out - j0 : 256;
        memcpy(y + j0, acc, sizeof(float) * (size_t)n);
    }
}

const pe_cpu_kernels pe_kernels_avx2 = {"avx2", NULL, packedmul_f16_avx2, pe_dense_f16_avx2};
