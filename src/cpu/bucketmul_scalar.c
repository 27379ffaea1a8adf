/* Portable scalar kernels: the C-level spec every ISA variant is tested against. */
#include <string.h>

#include "fp16.h"
#include "kernels.h"

#define BLOCK 64 /* groups per accumulator block: 64 * 16 floats = 4 KiB */

/* tasks (rows of B) -> y[16 g0, min(16 g1, n_out)) f32; each output summed in task order. */
static void bucketmul_f16_scalar(const pe_buckets *b, const pe_task *tasks, int64_t n_tasks,
                                 int64_t g0, int64_t g1, float *y) {
    float acc[BLOCK * PE_GROUP];
    int64_t pos_stride = (b->n_groups + 1) / 2;
    for (int64_t gb = g0; gb < g1; gb += BLOCK) {
        int64_t ge = gb + BLOCK < g1 ? gb + BLOCK : g1;
        memset(acc, 0, sizeof acc);
        for (int64_t t = 0; t < n_tasks; t++) {
            const uint16_t *v = b->values + tasks[t].row * b->n_groups;
            const uint8_t *p = b->positions + tasks[t].row * pos_stride;
            float xv = tasks[t].x;
            for (int64_t g = gb; g < ge; g++) {
                int pos = (p[g >> 1] >> ((g & 1) * 4)) & 0xF;
                acc[(g - gb) * PE_GROUP + pos] += xv * pe_f16_to_f32(v[g]);
            }
        }
        int64_t j0 = gb * PE_GROUP, j1 = ge * PE_GROUP < b->n_out ? ge * PE_GROUP : b->n_out;
        memcpy(y + j0, acc, sizeof(float) * (size_t)(j1 - j0));
    }
}

/* x (n_in,) f32 @ W[rows, j0:j1] fp16 -> y[j0:j1] f32; each output summed over rows in order. */
static void dense_f16_scalar(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                             const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1,
                             float *y) {
    for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
    for (int64_t r = 0; r < (rows ? n_rows : n_in); r++) {
        int64_t i = rows ? rows[r] : r;
        const uint16_t *row = w + i * n_out;
        float xi = x[i];
        for (int64_t j = j0; j < j1; j++) y[j] += xi * pe_f16_to_f32(row[j]);
    }
}

const pe_cpu_kernels pe_kernels_scalar = {"scalar", bucketmul_f16_scalar, NULL, dense_f16_scalar,
                                          NULL, NULL, NULL};
