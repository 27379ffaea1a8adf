/* Drivers: pick the CPU kernel set once, run selection and kernels per token. */
#include <stdlib.h>

#include "kernels.h"

static const pe_cpu_kernels *active_kernels(void) {
    return &pe_kernels_scalar;
}

const char *pe_kernel_name(void) { return active_kernels()->name; }

static int n_threads = 1;
int pe_num_threads(void) { return n_threads; }
void pe_set_num_threads(int n) { n_threads = n < 1 ? 1 : n; }

pe_status pe_bucketmul(const pe_buckets *b, const float *x, int64_t n_tokens, double effort,
                       float *y, int64_t *mults, int64_t *bytes) {
    const pe_cpu_kernels *kern = active_kernels();
    int64_t row_bytes = 2 * b->n_groups + (b->n_groups + 1) / 2;
    uint32_t *scratch = malloc(sizeof(uint32_t) * (size_t)(2 * b->n_rows + 1));
    pe_task *tasks = malloc(sizeof(pe_task) * (size_t)(b->n_rows + 1));
    pe_status st = (scratch && tasks) ? PE_OK : PE_ERR_ALLOC;
    for (int64_t t = 0; t < n_tokens && st == PE_OK; t++) {
        int64_t n_tasks = 0, done = 0;
        st = pe_select(b, x + t * b->n_in, effort, tasks, &n_tasks, &done, scratch);
        if (st != PE_OK) break;
        kern->bucketmul_f16(b, tasks, n_tasks, 0, b->n_groups, y + t * b->n_out);
        *mults += done;
        *bytes += n_tasks * row_bytes;
    }
    free(scratch);
    free(tasks);
    return st;
}

pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                       int64_t n_out, float *y) {
    const pe_cpu_kernels *kern = active_kernels();
    for (int64_t t = 0; t < n_tokens; t++)
        kern->dense_f16(x + t * n_in, w, n_in, n_out, 0, n_out, y + t * n_out);
    return PE_OK;
}
