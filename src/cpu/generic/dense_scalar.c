/* The portable scalar dense product, the C-level spec of arch/'s dense kernels. */
#include "fp16.h"
#include "kernels.h"

/* x (n_in,) f32 @ W[rows, j0:j1] fp16 -> y[j0:j1] f32; each output summed over rows in order. */
void pe_dense_f16_scalar(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                         const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y) {
    for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
    for (int64_t r = 0; r < (rows ? n_rows : n_in); r++) {
        int64_t i = rows ? rows[r] : r;
        const uint16_t *row = w + i * n_out;
        float xi = x[i];
        for (int64_t j = j0; j < j1; j++) y[j] += xi * pe_f16_to_f32(row[j]);
    }
}
