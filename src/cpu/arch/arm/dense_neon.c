/* NEON (arm64) dense fp16 GEMV: y[j0:j1] stays in L1 while 8 weight rows stream past it. */
#include <arm_neon.h>

#include "fp16.h"
#include "kernels.h"

#define ROWS 8 /* weight rows per pass over y */

/* x (n_in,) f32 @ W[inputs rows[r0:r1] (or r0..r1-1), j0:j1] fp16 -> y[j0:j1] f32, overwritten;
 * each output summed over the inputs in order. */
void pe_dense_f16_neon(const float *x, const uint16_t *w, int64_t n_out, const int32_t *rows,
                       int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    int64_t n = j1 - j0, full = n & ~(int64_t)7;
    float *yj = y + j0;
    for (int64_t j = 0; j < n; j++) yj[j] = 0.0f;
    for (int64_t r = r0; r < r1; r += ROWS) {
        int nu = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
        const uint16_t *wr[ROWS];
        float xs[ROWS];
        for (int u = 0; u < nu; u++) {
            int64_t i = rows ? rows[r + u] : r + u;
            wr[u] = w + i * n_out + j0;
            xs[u] = x[i];
        }
        for (int64_t j = 0; j < full; j += 8) {
            float32x4_t lo = vld1q_f32(yj + j), hi = vld1q_f32(yj + j + 4);
            for (int u = 0; u < nu; u++) {
                float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(wr[u] + j));
                lo = vfmaq_n_f32(lo, vcvt_f32_f16(vget_low_f16(h)), xs[u]);
                hi = vfmaq_n_f32(hi, vcvt_high_f32_f16(h), xs[u]);
            }
            vst1q_f32(yj + j, lo);
            vst1q_f32(yj + j + 4, hi);
        }
        for (int64_t j = full; j < n; j++) /* tail: scalar FMA, the same rounding */
            for (int u = 0; u < nu; u++)
                yj[j] = __builtin_fmaf(pe_f16_to_f32(wr[u][j]), xs[u], yj[j]);
    }
}
