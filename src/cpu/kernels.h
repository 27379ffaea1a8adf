/* The CPU kernel table: one implementation per ISA, chosen once at first use (dispatch.c). */
#ifndef PE_KERNELS_H
#define PE_KERNELS_H
#include "pyeffort.h"

/* One dispatched bucket row and the input value it is multiplied by. */
typedef struct {
    int64_t row;
    float x;
} pe_task;

/* tasks (rows of B, in row order) -> y[16 g0, min(16 g1, n_out)) f32, overwritten. */
typedef void (*pe_bucketmul_fn)(const pe_buckets *b, const pe_task *tasks, int64_t n_tasks,
                                int64_t g0, int64_t g1, float *y);
/* x (n_in,) f32 @ W[:, j0:j1] (n_in, n_out) fp16 -> y[j0:j1] f32, overwritten. */
typedef void (*pe_dense_fn)(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                            int64_t j0, int64_t j1, float *y);

typedef struct {
    const char *name;
    pe_bucketmul_fn bucketmul_f16;
    pe_dense_fn dense_f16;
} pe_cpu_kernels;

extern const pe_cpu_kernels pe_kernels_scalar;

/* x (n_in,) f32 at effort -> tasks in row order; *n_tasks, *mults set. tasks sized n_rows. */
pe_status pe_select(const pe_buckets *b, const float *x, double effort, pe_task *tasks,
                    int64_t *n_tasks, int64_t *mults, uint32_t *scratch);
#endif
