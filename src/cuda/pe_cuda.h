/* pyeffort CUDA backend: cutoff selection and the effort matmul on NVIDIA GPUs.
 * Semantics are reference.py's. Every entry point returns a status (below) and never exits; all
 * work is queued on the caller's stream with no host round trip, so a whole call can be captured
 * in a CUDA graph.
 *
 * One call = one cooperative kernel (bucketmul.cu) for a group of 1 to PE_MAX_GROUP matrices that
 * share the input x. Its blocks: for each matrix, n_tiles x n_splits workers (a column tile of the
 * rows of one split) and one selector block. Blocks of a matrix meet through counters in its state
 * (no grid-wide barrier): workers publish the level-1 histogram and the candidate rows, the
 * selector resolves the exact cutoff while the workers already stream the rows that are surely
 * dispatched. */
#ifndef PE_CUDA_H
#define PE_CUDA_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: the C core's (src/cpu/pyeffort.h), mapped to exceptions in one place
 * (pyeffort/errors.py); a CUDA runtime error e is PE_CUDA_ERR_DEVICE + e. */
#define PE_CUDA_OK 0
#define PE_CUDA_ERR_ARG 3        /* inconsistent arguments (a caller bug: Python validates) */
#define PE_CUDA_ERR_DEVICE 1000  /* + the cudaError_t */
#define PE_MAX_GROUP 4           /* matrices per call (pyeffort._devices.GROUP_MAX, as the C core) */

/* dtype codes of activations and outputs */
enum { PE_F32 = 0, PE_F16 = 1, PE_BF16 = 2 };

/* Per-matrix device state, 64 bytes (zeroed once at allocation). The meeting counter only
 * grows (mod 2^32); a call waits for it to reach base + participants, with the base read at its
 * start (hbase for hist_done). Nothing is reset at the end of a call: the selector advances the
 * bases as soon as every worker has read them (all histograms in). The other meetings are
 * tagged words, (tag << 32) | value with tag = epoch + 1 of the call: the cut (cut_word), each
 * worker's candidate count and the split partial sums (scratch of the group). A matrix may run
 * alone and in groups, with other split counts: the bases and tags follow. */
typedef struct {
    uint32_t hist_done, unused0;                     /* meeting counter                      */
    unsigned long long cut_word;                     /* (epoch + 1) << 32 | cut              */
    uint32_t tbase, epoch, cut, hbase;               /* epoch: calls so far (its parity picks
                                                        the histogram buffer); tbase: unused */
    unsigned long long mults;                        /* realised mults of the last call       */
    unsigned long long info_mults, info_rows;        /* sums over calls, reset by the caller  */
    unsigned long long info_records;                 /* q8: dispatched records (input, tier),
                                                        summed as info_rows                   */
} pe_cuda_state;

/* A matrix on the device: canonical selection data plus the tile-major repack of the rows.
 * fp16 values (q8 == 0): wt is (n_tiles, n_rows, 5 * ct / 2) bytes; the chunk of row r holds ct
 * fp16 values then ct/2 nibble bytes.
 * int8 values (q8 == 1): wt is (n_tiles, n_records, 13 * ct / 2) bytes; a record is one tier
 * (ranks 4t..4t+3) of one input, record i = scales row i of reference.py: its ct/4 fp16 scales
 * (one per 4 groups), then 4 row chunks of ct int8 values and ct/2 nibble bytes each. Row r
 * lives in chunk slot[r] % 4 of record slot[r] / 4; chunk 0 holds the record's row of largest
 * statistic (so a record is dispatched exactly when its chunk 0 is: info_records). */
typedef struct {
    const uint8_t *wt;
    const int32_t *order;    /* (n_rows,) input of each row                      */
    const float *stats;      /* (n_rows,) statistic of each row                  */
    uint32_t *hist;          /* (2, 4096) level-1 weight histograms (by parity)  */
    uint32_t *cand;          /* (n_workers, pe_cand_stride) scratch, zeroed: per worker a
                                tagged count, then tagged candidate keys | short << 31 (64
                                bits each) */
    unsigned long long *partial; /* (n_splits, n_tiles * 16 * ct) scratch, zeroed: tagged
                                    float bits of the split sums                */
    const int32_t *slot;     /* q8: (n_rows,) 4 * record + chunk of each row; else NULL */
    pe_cuda_state *state;
    int64_t n_in, n_out, n_rows;
    int32_t ct, n_tiles, n_splits, block0; /* block0: first worker block in the grid */
    int32_t cand_seg, q8;                  /* candidates a worker publishes, at most;
                                              q8: int8 values (one kind per group)       */
    unsigned long long total_w; /* real multiplications in the loaded rows */
} pe_cuda_matrix;

/* Matrices of one call (same ct, same x, same value kind: the kernel is compiled per kind). Worker blocks of m[i] are block0 .. block0 +
 * n_tiles * n_splits - 1 (in order, from 0); the selector of m[i] is block n_workers + i. */
typedef struct {
    pe_cuda_matrix m[PE_MAX_GROUP];
    void *y[PE_MAX_GROUP];
    int32_t n_mat, n_workers;
} pe_cuda_group;

/* Raise kernel attributes once. -> a status. */
int pe_cuda_init(void);

/* x (n_tokens, n_in) of x_dtype @ each matrix of g at its effort -> g.y[i] (n_tokens, n_out_i)
 * of y_dtype. Matrix i's effort is effort_ptr[effort_each ? i : 0] when effort_ptr (device
 * float64; n_mat values with effort_each = 1) is not NULL, else effort_val (effort_each = 0).
 * stream is a cudaStream_t; with pdl, the kernel uses programmatic dependent launch; with coop,
 * it is launched cooperative (all blocks resident at once, as the kernel needs). -> a status. */
int pe_cuda_matmul(const pe_cuda_group *g, const void *x, int x_dtype, int64_t n_tokens,
                   const double *effort_ptr, double effort_val, int effort_each, int y_dtype,
                   void *stream, int pdl, int coop);

/* The same product by the cluster kernel (cluster.cu): every matrix of g with one split count
 * C = n_splits in 1..16 (a power of two), its blocks tile-major (block0 + tile * C + split:
 * a cluster of C blocks per column tile); hist, cand and partial are not used. No cooperative
 * launch: clusters meet nobody. tol (0 .. 0.5): 0 for the exact cutoff; else, when the level-1
 * bin of the cut weighs at most 2 tol n_in n_out, that bin is taken whole or not at all (the
 * nearer to the budget: realised multiplications within tol n_in n_out of it), with no levels 2
 * and 3; the realised count stays exact. pe_cuda_cluster_init raises its kernel attributes once. */
int pe_cuda_cluster_init(void);
/* Clusters of C blocks of tile width ct that the device holds at once -> *n (after
 * pe_cuda_cluster_init; cudaOccupancyMaxActiveClusters: GPC boundaries counted). */
int pe_cuda_max_clusters(int C, int ct, int *n);
int pe_cuda_matmul_cluster(const pe_cuda_group *g, const void *x, int x_dtype, int64_t n_tokens,
                           const double *effort_ptr, double effort_val, int effort_each,
                           int y_dtype, void *stream, int pdl, double tol);

/* Dense 8-bit weight-only GEMV (dense_q8.cu; pyeffort.dense's Q8_0): x (n_tokens, n_in) @ W ->
 * y (n_tokens, n_out), W[i, j] = q[i, j] * scales[i / 32, j], q (n_in, n_out) int8, scales
 * (ceil(n_in / 32), n_out) fp16 bits. n_split > 1: partial (n_split, n_out) f32 and count
 * (ceil(n_out / 256),) u32 zeroed scratch (left zeroed). -> a status. */
int pe_cuda_dense_q8(const void *x, int x_dtype, int64_t n_tokens, const int8_t *q,
                     const uint16_t *scales, int64_t n_in, int64_t n_out, int n_split,
                     float *partial, uint32_t *count, void *y, int y_dtype, void *stream, int pdl);

/* Channel skipping (channel_skip.cu): per token the k rows of largest |x_i| (ties: lower index)
 * of W (n_in, n_out) fp16 bits, row-major -> y = sum of x_i W[i, :] over them. rows (k,) i32 and
 * xs (k,) f32 scratch; partial and count as pe_cuda_dense_q8's. -> a status. */
int pe_cuda_channel_skip(const void *x, int x_dtype, int64_t n_tokens, int64_t k, const uint16_t *w,
                         int64_t n_in, int64_t n_out, int n_split, int32_t *rows, float *xs,
                         float *partial, uint32_t *count, void *y, int y_dtype, void *stream,
                         int pdl);

/* The CUDA runtime's message for a status above PE_CUDA_ERR_DEVICE, else NULL. */
const char *pe_cuda_error_string(int status);

#ifdef __cplusplus
}
#endif
#endif
