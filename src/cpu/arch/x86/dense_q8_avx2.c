/* AVX2 + F16C + FMA dense Q8_0 GEMV: y[j0:j1] stays in L1/L2 while 8 rows of one block stream
 * past it; their sum over 32 columns (four registers) is scaled into y; every other step asks
 * for a line of each of the next 8 rows (as dense_q8_avx512.c). */
#include <immintrin.h>

#include "fp16.h"
#include "kernels.h"

#define ROWS 8  /* weight rows per pass over y (a quarter block) */
#define COLS 32 /* columns per step: 4 accumulators of 8 */

/* int8 q[0:8] -> f32. */
static inline __m256 q8x8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* y[0:8 c] += s[0:8 c] * (x[0:nr] . q[0:nr, 0:8 c]) for c (1..4) vectors of 8 columns; ahead:
 * also asks for the line at q of each of the next 8 rows. */
static inline void step(const __m256 *xv, const int8_t *q, const uint16_t *s, int64_t n_out,
                        int nr, int c, int ahead, float *y) {
    __m256 a[COLS / 8];
    for (int k = 0; k < c; k++) a[k] = _mm256_setzero_ps();
    for (int u = 0; u < ROWS && ahead; u++) /* the next pass's rows, read ahead into L2 */
        _mm_prefetch((const char *)(q + (u + ROWS) * n_out), _MM_HINT_T1);
    for (int u = 0; u < nr; u++)
        for (int k = 0; k < c; k++)
            a[k] = _mm256_fmadd_ps(q8x8(q + u * n_out + 8 * k), xv[u], a[k]);
    for (int k = 0; k < c; k++) {
        __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8 * k)));
        _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(a[k], sc, _mm256_loadu_ps(y + 8 * k)));
    }
}

/* x (n_in,) f32 @ Q8_0 W[r0:r1, j0:j1] (q int8 (n_in, n_out), scales fp16 (ceil(n_in / 32),
 * n_out)) -> y[j0:j1] f32, overwritten; per output y += scale * (x.q over 8 inputs), in order. */
void pe_dense_q8_avx2(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_out,
                      int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    int64_t n = j1 - j0, full = n & ~(int64_t)7;
    float *yj = y + j0;
    for (int64_t j = 0; j < n; j++) yj[j] = 0.0f;
    for (int64_t r = r0; r < r1; r += ROWS) {
        int nr = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
        const int8_t *qr = q + r * n_out + j0;
        const uint16_t *s = scales + r / PE_Q8_BLOCK * n_out + j0;
        __m256 xv[ROWS];
        for (int u = 0; u < nr; u++) xv[u] = _mm256_set1_ps(x[r + u]);
        int64_t j = 0;
        int ahead = r + 2 * ROWS <= r1;
        for (; j + COLS <= full; j += COLS)
            step(xv, qr + j, s + j, n_out, nr, COLS / 8, ahead && (j & 63) == 0, yj + j);
        if (j < full) step(xv, qr + j, s + j, n_out, nr, (int)(full - j) / 8, 0, yj + j);
        for (j = full; j < n; j++) { /* tail: scalar FMA, the same rounding */
            float acc = 0.0f;
            for (int u = 0; u < nr; u++)
                acc = __builtin_fmaf((float)qr[u * n_out + j], x[r + u], acc);
            yj[j] = __builtin_fmaf(acc, pe_f16_to_f32(s[j]), yj[j]);
        }
    }
}
