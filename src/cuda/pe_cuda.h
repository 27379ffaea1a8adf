/* pyeffort CUDA backend: cutoff selection and the effort matmul on NVIDIA GPUs.
 * Semantics are reference.py's. Every entry point returns a status (0 = ok, else a cudaError_t
 * value or PE_CUDA_ERR_ARG) and never exits; all work is queued on the caller's stream with no
 * host round trip, so a whole call can be captured in a CUDA graph. */
#ifndef PE_CUDA_H
#define PE_CUDA_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PE_CUDA_ERR_ARG 100000 /* inconsistent arguments (a caller bug: Python validates) */

/* dtype codes of activations and outputs */
enum { PE_F32 = 0, PE_F16 = 1, PE_BF16 = 2 };

/* Per-matrix device state (zeroed once at allocation; every kernel leaves it reusable). */
typedef struct {
    uint32_t ticket1, ticket2, n_cand, mode; /* mode: 0 search, 1 none, 2 all rows        */
    uint32_t b1, cut, above_n, rows;         /* cut: dispatch rows with key >= cut         */
    unsigned long long above_w, mults;       /* weights strictly above; realised mults     */
    unsigned long long info_mults, info_rows; /* sums over calls, reset by the caller       */
} pe_cuda_state;

/* A matrix on the device: canonical selection data plus the tile-major repack of the rows.
 * wt: (n_tiles, n_rows, 5 * ct / 2) bytes; a chunk holds ct fp16 values then ct/2 nibble bytes. */
typedef struct {
    const uint8_t *wt;
    const int32_t *order;    /* (n_rows,) input of each row        */
    const float *stats;      /* (n_rows,) statistic of each row    */
    uint32_t *keys;          /* (n_rows,) scratch: float bits of s */
    float *xval;             /* (n_rows,) scratch: x[order[r]]     */
    uint32_t *hist;          /* (2 * 4096,) scratch, zero between calls */
    uint32_t *cand;          /* (n_rows,) scratch                  */
    float *partial;          /* (n_splits, n_tiles * 16 * ct) scratch */
    uint32_t *tickets;       /* (n_tiles,) scratch, zero between calls */
    pe_cuda_state *state;
    long long *timing;       /* NULL, or (32,) %globaltimer stamps of the kernels' phases */
    int64_t n_in, n_out, n_rows;
    int32_t ct, n_tiles, n_splits;
    unsigned long long total_w; /* real multiplications in the loaded rows */
} pe_cuda_matrix;

/* Raise kernel attributes once; returns a status. */
int pe_cuda_init(void);

/* x (n_tokens, n_in) of x_dtype @ m at effort -> y (n_tokens, n_out) of y_dtype.
 * effort is *effort_ptr when effort_ptr (device float64) is not NULL, else effort_val.
 * stream is a cudaStream_t; with pdl, kernels use programmatic dependent launch. */
int pe_cuda_matmul(const pe_cuda_matrix *m, const void *x, int x_dtype, int64_t n_tokens,
                   const double *effort_ptr, double effort_val, void *y, int y_dtype,
                   void *stream, int pdl);

/* Only parts of the cutoff search of one token, for timing: stages 1 runs the key kernel, 2 the
 * key and candidate kernels (the last level runs inside the matmul kernel); each is followed by
 * a one-block kernel that clears the histogram, as the matmul kernel would. */
int pe_cuda_select(const pe_cuda_matrix *m, const void *x, int x_dtype,
                   const double *effort_ptr, double effort_val, void *stream, int pdl,
                   int stages);

/* Multiprocessor count of the current device, or a negative status. */
int pe_cuda_num_sms(void);

const char *pe_cuda_error_string(int status);

#ifdef __cplusplus
}
#endif
#endif
