/* NEON (arm64) dense Q8_0 GEMV: y[j0:j1] stays in L1/L2 while 8 rows of one block stream past
 * it; their sum over 16 columns (four registers) is scaled into y. */
#include <arm_neon.h>

#include "fp16.h"
#include "kernels.h"

#define ROWS 8 /* weight rows per pass over y (a quarter block) */

/* a[0:4] += x * the 16 int8 q[0:16] as f32. */
static inline void fma16(float32x4_t a[4], const int8_t *q, float x) {
    int8x16_t v = vld1q_s8(q);
    int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
    a[0] = vfmaq_n_f32(a[0], vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), x);
    a[1] = vfmaq_n_f32(a[1], vcvtq_f32_s32(vmovl_high_s16(lo)), x);
    a[2] = vfmaq_n_f32(a[2], vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), x);
    a[3] = vfmaq_n_f32(a[3], vcvtq_f32_s32(vmovl_high_s16(hi)), x);
}

/* x (n_in,) f32 @ Q8_0 W[r0:r1, j0:j1] (q int8 (n_in, n_out), scales fp16 (ceil(n_in / 32),
 * n_out)) -> y[j0:j1] f32, overwritten; per output y += scale * (x.q over 8 inputs), in order. */
void pe_dense_q8_neon(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_out,
                      int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    int64_t n = j1 - j0, full = n & ~(int64_t)15;
    float *yj = y + j0;
    for (int64_t j = 0; j < n; j++) yj[j] = 0.0f;
    for (int64_t r = r0; r < r1; r += ROWS) {
        int nr = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
        const int8_t *qr = q + r * n_out + j0;
        const uint16_t *s = scales + r / PE_Q8_BLOCK * n_out + j0;
        const float *xr = x + r;
        int64_t j = 0;
        for (; j < full; j += 16) {
            float32x4_t a[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
            for (int u = 0; u < nr; u++) fma16(a, qr + u * n_out + j, xr[u]);
            float16x8_t h0 = vreinterpretq_f16_u16(vld1q_u16(s + j));
            float16x8_t h1 = vreinterpretq_f16_u16(vld1q_u16(s + j + 8));
            float32x4_t sc[4] = {vcvt_f32_f16(vget_low_f16(h0)), vcvt_high_f32_f16(h0),
                                 vcvt_f32_f16(vget_low_f16(h1)), vcvt_high_f32_f16(h1)};
            for (int k = 0; k < 4; k++)
                vst1q_f32(yj + j + 4 * k, vfmaq_f32(vld1q_f32(yj + j + 4 * k), a[k], sc[k]));
        }
        for (; j < n; j++) { /* tail: scalar FMA, the same rounding */
            float acc = 0.0f;
            for (int u = 0; u < nr; u++) acc = __builtin_fmaf((float)qr[u * n_out + j], xr[u], acc);
            yj[j] = __builtin_fmaf(acc, pe_f16_to_f32(s[j]), yj[j]);
        }
    }
}
