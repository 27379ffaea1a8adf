/* The portable scalar dense product, the C-level spec of arch/'s dense fp16 kernels. */
#include "fp16.h"
#include "kernels.h"

/* x (n_in,) f32 @ W[inputs rows[r0:r1] (or r0..r1-1), j0:j1] fp16 -> y[j0:j1] f32, overwritten;
 * each output summed over the inputs in order. */
void pe_dense_f16_scalar(const float *x, const uint16_t *w, int64_t n_out, const int32_t *rows,
                         int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y) {
    for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        int64_t i = rows ? rows[r] : r;
        const uint16_t *row = w + i * n_out;
        float xi = x[i];
        for (int64_t j = j0; j < j1; j++) y[j] += xi * pe_f16_to_f32(row[j]);
    }
}
