/* The portable scalar dense Q8_0 product, the C-level spec of arch/'s dense_q8 kernels. */
#include "fp16.h"
#include "kernels.h"

#define ROWS 8 /* inputs summed before a scale is applied (a quarter block) */

/* x (n_in,) f32 @ Q8_0 W[r0:r1, j0:j1] (q int8 (n_in, n_out), scales fp16 (ceil(n_in / 32),
 * n_out)) -> y[j0:j1] f32, overwritten; per output y += scale * (x.q over 8 inputs), in order. */
void pe_dense_q8_scalar(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_out,
                        int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
    for (int64_t r = r0; r < r1; r += ROWS) {
        int64_t e = r1 - r < ROWS ? r1 : r + ROWS;
        const uint16_t *s = scales + r / PE_Q8_BLOCK * n_out;
        for (int64_t j = j0; j < j1; j++) {
            float acc = 0.0f;
            for (int64_t i = r; i < e; i++) acc += x[i] * (float)q[i * n_out + j];
            y[j] += pe_f16_to_f32(s[j]) * acc;
        }
    }
}
