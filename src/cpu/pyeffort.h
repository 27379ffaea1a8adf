/* pyeffort C core: bucket construction, cutoff selection and the effort matmul.
 * Semantics are defined by pyeffort/reference.py; this header is the C-level contract.
 * Every function returns a pe_status and never exits, aborts or prints. */
#ifndef PYEFFORT_H
#define PYEFFORT_H
#include <stdint.h>

#define PE_GROUP 16   /* outputs per group */
#define PE_RANKS 16   /* bucket rows per input */

typedef enum {
    PE_OK = 0,
    PE_ERR_ALLOC = 1,      /* out of memory */
    PE_ERR_NONFINITE = 2,  /* NaN or Inf in an input */
    PE_ERR_ARG = 3,        /* inconsistent sizes (a caller bug: Python validates first) */
    PE_ERR_THREAD = 4,     /* a worker thread could not be started */
    PE_ERR_FORMAT = 5,     /* matrix data a fast layout cannot hold: repeated positions in a
                            * group, non-finite fp16 values, int8 values of -128, q8 scales
                            * that are not finite or negative (only a damaged matrix has them) */
} pe_status;

/* The kind of a matrix's bucket values (reference.py, "8-bit values"). */
typedef enum {
    PE_VALUES_F16 = 0, /* fp16 values                                                    */
    PE_VALUES_Q8 = 1,  /* int8 values in [-127, 127], one fp16 scale per tier and chunk  */
} pe_values;

/* A bucketed matrix, canonical layout (see reference.py). Rows r = k * n_in + j, r < n_rows. */
typedef struct {
    const void *values;        /* (n_rows, n_groups) fp16 bits, or int8 (PE_VALUES_Q8)  */
    const uint8_t *positions;  /* (n_rows, (n_groups + 1) / 2) 4-bit, even group low    */
    const float *stats;        /* (16, n_in) row statistic, row order                   */
    const int32_t *order;      /* (16, n_in) input of each row                          */
    int64_t n_in, n_out, n_groups, n_rows;
    /* PE_VALUES_Q8: (reference.scale_rows(n_rows, n_in), ceil(n_groups / 4)) fp16 bits, row
     * t * n_in + j the scales of tier t (ranks 4t..4t+3) of input order[4t, j] over each chunk
     * of 4 groups (reference.quantise_q8); NULL for fp16 values. */
    const uint16_t *scales;
    pe_values kind;
} pe_buckets;

/* W (n_in, n_out) fp16 -> canonical buckets; outputs sized for all 16 * n_in rows. */
pe_status pe_build_f16(const uint16_t *w, int64_t n_in, int64_t n_out, uint16_t *values,
                       uint8_t *positions, float *stats, int32_t *order);

/* x (n_tokens, n_in) f32 @ W (n_in, n_out) fp16 -> y (n_tokens, n_out) f32. */
pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                       int64_t n_out, float *y);

/* x (n_tokens, n_in) f32 @ W[rows] (n_in, n_out) fp16, only the inputs rows (n_rows,) (any
 * order, each in 0..n_in-1) -> y (n_tokens, n_out) f32: channel skipping. */
pe_status pe_dense_rows_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                            int64_t n_out, const int32_t *rows, int64_t n_rows, float *y);

/* x (n_tokens, n_in) f32 @ the dense Q8_0 matrix (q (n_in, n_out) int8, scales (ceil(n_in /
 * 32), n_out) fp16: W[i, j] = q[i, j] * scales[i / 32, j]) -> y (n_tokens, n_out) f32. */
pe_status pe_dense_q8(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_tokens,
                      int64_t n_in, int64_t n_out, float *y);

/* The input-major index of a pe_buckets and the in-memory copy of the weights that the
 * kernel set in use reads (layout/index.c), built once per matrix for that kernel set and
 * value kind; the index keeps no pointer into b. PE_ERR_FORMAT if b is damaged (PE_ERR_FORMAT
 * above), on every kernel set; PE_ERR_ARG for int8 values without scales. */
typedef struct pe_packed pe_packed;
pe_status pe_pack(const pe_buckets *b, pe_packed **out);
void pe_packed_free(pe_packed *p);
/* Starts reading the n matrices' statistics, then their in-memory copies, into the caches on
 * an idle pool thread (two or more threads), returning at once: for the matrices a caller
 * multiplies next (a newer call replaces the request). */
void pe_warm_packed(const pe_packed *const *ps, int n);
/* x (n_tokens, n_in) f32 @ B at effort -> y (n_tokens, n_out) f32, through p (pe_pack(b)) on
 * the kernel set p was packed for; adds the multiplications done to *mults and the canonical
 * bytes of the dispatched rows to *bytes (reference.bucketmul's count: values and positions
 * per row, and for q8 2 ceil(n_groups / 4) per dispatched tier of an input). */
pe_status pe_bucketmul(const pe_packed *p, const pe_buckets *b, const float *x, int64_t n_tokens,
                       double effort, float *y, int64_t *mults, int64_t *bytes);
/* Matrices that share their input, multiplied together (q/k/v, gate/up). */
#define PE_MAX_GROUP 4
/* One token x (n_in,) f32 @ the n (1..PE_MAX_GROUP) matrices bs[j] (indices ps[j], one n_in),
 * matrix j at efforts[j] -> ys[j] (n_out_j,) f32; adds to mults[j], bytes[j]. The same bits as n
 * pe_bucketmul calls: one pool job runs the n cutoff searches, then every matrix's kernel,
 * each as soon as its search is done (one hand-off instead of n). */
pe_status pe_bucketmul_group(int n, const pe_packed *const *ps, const pe_buckets *const *bs,
                             const float *x, const double *efforts, float *const *ys,
                             int64_t *mults, int64_t *bytes);
/* The weights p's kernel reads: "tiered" or "permuted" (in-memory copies, kernels.h) or
 * "canonical" (the rows in place, through the index: the scalar spec). */
const char *pe_packed_copy(const pe_packed *p);

/* One decoding step's vector work between the matrix products (decode.c; reference.rmsnorm,
 * rope, attend): x (n,) -> out (n,) = x / sqrt(mean(x^2) + eps) * w; */
void pe_rmsnorm_f32(const float *x, const float *w, int64_t n, float eps, float *out);
/* g, u (n,) -> out (n,) = silu(g) * u = g / (1 + e^-g) * u (the SwiGLU activation) */
void pe_silu_mul_f32(const float *g, const float *u, int64_t n, float *out);
/* x (heads, hd) rotated in place at one position, pairs (j, j + hd/2), cos, sin (hd/2,); */
void pe_rope_f32(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin);
/* q (n_heads, hd) against the cache k, v (n_kv, cap, hd) at positions [lo, end) -> out
 * (n_heads, hd), head t on kv head t / (n_heads / n_kv), softmax of scale * q.k. */
pe_status pe_attend_f32(const float *q, const float *k, const float *v, int64_t n_heads,
                        int64_t n_kv, int64_t cap, int64_t hd, int64_t lo, int64_t end,
                        float scale, float *out);

/* Name of the CPU kernel set in use, and the features the machine has. */
const char *pe_kernel_name(void);
const char *pe_cpu_features(void);  /* e.g. "avx2 f16c fma avx512f avx512bw avx512vl" */
/* Kernel sets this machine runs, comma separated: the SIMD ones best first, then the portable
 * ones (e.g. "avx512,avx2,scalar,scalar-tiered,scalar-permuted"), after
 * PYEFFORT_DISABLE_CPU_FEATURES. */
const char *pe_available_kernels(void);
/* Force a kernel set by name; PE_ERR_ARG if it is unknown or not available here. */
pe_status pe_use_kernel(const char *name);
/* Threads a call may use; a call reads it once, so another thread may change it meanwhile. */
int pe_num_threads(void);
void pe_set_num_threads(int n);
#endif
