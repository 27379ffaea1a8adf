/* AVX2 + F16C + FMA dense fp16 GEMV: y[j0:j1] stays in L1 while 8 weight rows stream past. */
#include <immintrin.h>

#include "fp16.h"
#include "kernels.h"

#define ROWS 8 /* weight rows per pass over y */

/* x (n_in,) f32 @ W[inputs rows[r0:r1] (or r0..r1-1), j0:j1] fp16 -> y[j0:j1] f32, overwritten;
 * each output summed over the inputs in order. */
void pe_dense_f16_avx2(const float *x, const uint16_t *w, int64_t n_out, const int32_t *rows,
                       int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    int64_t n = j1 - j0, full = n & ~(int64_t)7;
    float *yj = y + j0;
    for (int64_t j = 0; j < n; j++) yj[j] = 0.0f;
    for (int64_t r = r0; r < r1; r += ROWS) {
        int nu = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
        const uint16_t *wr[ROWS];
        __m256 xv[ROWS];
        for (int u = 0; u < nu; u++) {
            int64_t i = rows ? rows[r + u] : r + u;
            wr[u] = w + i * n_out + j0;
            xv[u] = _mm256_set1_ps(x[i]);
        }
        if (nu == ROWS) {
            for (int64_t j = 0; j < full; j += 8) {
                __m256 acc = _mm256_loadu_ps(yj + j);
                for (int u = 0; u < ROWS; u++)
                    acc = _mm256_fmadd_ps(
                        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[u] + j))), xv[u], acc);
                _mm256_storeu_ps(yj + j, acc);
            }
        } else {
            for (int64_t j = 0; j < full; j += 8) {
                __m256 acc = _mm256_loadu_ps(yj + j);
                for (int u = 0; u < nu; u++)
                    acc = _mm256_fmadd_ps(
                        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[u] + j))), xv[u], acc);
                _mm256_storeu_ps(yj + j, acc);
            }
        }
        for (int64_t j = full; j < n; j++) /* tail: scalar FMA, the same rounding */
            for (int u = 0; u < nu; u++)
                yj[j] = __builtin_fmaf(pe_f16_to_f32(wr[u][j]), _mm256_cvtss_f32(xv[u]), yj[j]);
    }
}
