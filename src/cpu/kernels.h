/* The CPU kernel table: one implementation per ISA, chosen once at first use (dispatch.c). */
#ifndef PE_KERNELS_H
#define PE_KERNELS_H
#include <string.h>

#include "pyeffort.h"

#define PE_TILE 16 /* groups per tile of the packed layout: 16 groups = 256 outputs */

/* One dispatched bucket row and the input value it is multiplied by (canonical layout). */
typedef struct {
    int64_t row;
    float x;
} pe_task;

/* A run of dispatched slots of one input in the packed layout: slots [slot, slot + n), value x. */
typedef struct {
    int32_t slot, n;
    float x;
} pe_run;

/* The packed in-memory layout (pack.c): the canonical rows reordered input-major, so an input's
 * dispatched ranks are one contiguous run of rows, and padded to whole tiles of 16 groups.
 * Slot s = slot0[i] + k holds rank k of input i, k < n_loaded[i]. */
struct pe_packed {
    uint16_t *values;   /* (n_slots, 16 n_tiles) fp16, zero past G                        */
    uint8_t *pos;       /* (n_slots, 8 n_tiles) positions, group 2l low nibble of byte l  */
    float *stats;       /* (n_in, 16) statistic of rank k of input i, 0 if not loaded     */
    int32_t *slot0;     /* (n_in,) first slot of input i                                  */
    uint8_t *n_loaded;  /* (n_in,) loaded ranks of input i (a prefix of its ranks)        */
    int64_t n_in, n_out, n_groups, n_tiles, n_slots;
    int64_t m[PE_RANKS];  /* real multiplications of a row of rank k                     */
    int64_t unloaded;     /* sum of m over the slots that are not loaded                 */
};

/* Kernels walk the runs in batches of about PE_BATCH slots: a batch's row segments are first
 * copied in row order into a contiguous buffer (streaming reads), then, tile by tile, the tile's
 * accumulators stay in registers or L1 while the staged rows pass. */
#define PE_BATCH 64
#define PE_CHUNK 64 /* tiles per pass: 64 KiB of accumulators on the stack */

/* The end of the batch of runs starting at r0: at most PE_BATCH slots, at least one run. */
static inline int64_t pe_batch_end(const pe_run *runs, int64_t n_runs, int64_t r0) {
    int64_t r1 = r0 + 1, n = runs[r0].n;
    while (r1 < n_runs && n + runs[r1].n <= PE_BATCH) n += runs[r1++].n;
    return r1;
}

/* Copies the row segments [c0, c1) of the slots of runs[r0, r1) into vals, pos (contiguous,
 * strides vs, qs) and their x into xs; returns the slot count. Streams the rows in order. */
static inline int64_t pe_stage(const pe_packed *pk, const pe_run *runs, int64_t r0, int64_t r1,
                     int64_t c0, int64_t c1, uint16_t *vals, uint8_t *pos, float *xs) {
    int64_t rvs = pk->n_tiles * PE_TILE, rqs = pk->n_tiles * (PE_TILE / 2), n = 0;
    size_t nv = sizeof(uint16_t) * (size_t)((c1 - c0) * PE_TILE), nq = (size_t)((c1 - c0) * 8);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t s = runs[r].slot; s < runs[r].slot + runs[r].n; s++, n++) {
            memcpy(vals + n * (int64_t)(nv / 2), pk->values + s * rvs + c0 * PE_TILE, nv);
            memcpy(pos + n * (int64_t)nq, pk->pos + s * rqs + c0 * (PE_TILE / 2), nq);
            xs[n] = runs[r].x;
        }
    return n;
}

/* tasks (rows of B, in row order) -> y[16 g0, min(16 g1, n_out)) f32, overwritten. */
typedef void (*pe_bucketmul_fn)(const pe_buckets *b, const pe_task *tasks, int64_t n_tasks,
                                int64_t g0, int64_t g1, float *y);
/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)) f32, overwritten (tiles t0..t1). */
typedef void (*pe_packedmul_fn)(const pe_packed *p, const pe_run *runs, int64_t n_runs,
                                int64_t t0, int64_t t1, float *y);
/* x (n_in,) f32 @ W[rows, j0:j1] (n_in, n_out) fp16 -> y[j0:j1] f32, overwritten; rows
 * (n_rows,) the inputs to sum over in order, or NULL for all n_in. */
typedef void (*pe_dense_fn)(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                            const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1,
                            float *y);

typedef struct {
    const char *name;
    pe_bucketmul_fn bucketmul_f16; /* canonical layout (the scalar spec), or NULL */
    pe_packedmul_fn packedmul_f16; /* packed layout, or NULL                      */
    pe_dense_fn dense_f16;
} pe_cpu_kernels;

extern const pe_cpu_kernels pe_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const pe_cpu_kernels pe_kernels_avx2;
extern const pe_cpu_kernels pe_kernels_avx512;
#endif
#if defined(__aarch64__)
extern const pe_cpu_kernels pe_kernels_neon;
#endif

/* x (n_in,) f32 at effort -> tasks in row order; *n_tasks, *mults set. tasks sized n_rows. */
pe_status pe_select(const pe_buckets *b, const float *x, double effort, pe_task *tasks,
                    int64_t *n_tasks, int64_t *mults, uint32_t *scratch);
/* x (n_in,) f32 at effort -> runs (at most n_slots); *n_runs, *n_rows, *mults set.
 * scratch: 2 * 16 * n_in + 1 uint32. Same dispatched rows as pe_select (reference.cutoff). */
pe_status pe_select_packed(const pe_packed *p, const float *x, double effort, pe_run *runs,
                           int64_t *n_runs, int64_t *n_rows, int64_t *mults, uint32_t *scratch);

/* Thread pool (threads.c): fn(ctx, c, n_chunks) for every chunk c in [0, n_chunks), on up to
 * n_threads threads (the caller included), in any order and assignment. */
typedef void (*pe_job_fn)(void *ctx, int c, int n_chunks);
pe_status pe_parallel(pe_job_fn fn, void *ctx, int n_chunks, int n_threads);
#endif
