/* Cutoff selection on the device (reference.cutoff): an exact three-level radix search over the
 * float bits of s = |x[order[r]]| * stats[r], weighted by the row multiplications.
 *   k_keys: keys and x per row, level-1 histogram (12 bits).
 *   k_cand: every block picks the level-1 bin from the histogram (the same in all blocks) and
 *           appends its rows in that bin to the candidate list.
 *   pe_resolve (resolve.cuh, run by every block of the matmul kernel): levels 2 and 3.
 * No block waits for another inside a kernel (no tickets), and only integer atomics are used:
 * the cutoff does not depend on the order blocks run in. */
#include "common.cuh"

#define PE_KEY_ROWS 512  /* rows per k_keys block: one per thread, no dependent load chains */
#define PE_CAND_ROWS 2048 /* rows per k_cand block: four per thread */

/* x (n_in,) -> keys, xval (n_rows,); hist (2, PE_NB1) += level-1 counts and short counts. */
template <typename TX>
__global__ void __launch_bounds__(PE_SEL_THREADS) k_keys(const TX *__restrict__ x, pe_cuda_matrix m) {
    __shared__ uint32_t h_n[PE_NB1], h_s[PE_NB1];
    PE_STAMP0(m, 8);
    for (int b = threadIdx.x; b < PE_NB1; b += blockDim.x) h_n[b] = h_s[b] = 0;
    pe_pdl_wait();
    PE_STAMP0(m, 9);
    pe_pdl_launch();
    if (blockIdx.x == 0 && threadIdx.x == 0) m.state->n_cand = 0; /* last call's list is used */
    __syncthreads();
    const int64_t r = (int64_t)blockIdx.x * PE_KEY_ROWS + threadIdx.x;
    if (r < m.n_rows) {
        float xv = pe_to_f32(x[m.order[r]]);
        float s = __fmul_rn(fabsf(xv), m.stats[r]);
        uint32_t key = __float_as_uint(s) & 0x7FFFFFFFu;
        m.keys[r] = key;
        m.xval[r] = xv;
        atomicAdd(&h_n[key >> 19], 1u);
        if (pe_is_short(r, m.n_in, (int)(m.n_out % 16))) atomicAdd(&h_s[key >> 19], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < PE_NB1; b += blockDim.x) {
        if (h_n[b]) atomicAdd(&m.hist[b], h_n[b]);
        if (h_s[b]) atomicAdd(&m.hist[PE_NB1 + b], h_s[b]);
    }
    PE_STAMP_MAX(m, 10);
}

/* hist -> mode, level-1 bin b1 and the weight above it (every block the same); rows with
 * key >> 19 == b1 -> candidate list (key | short << 31). Block 0 records mode and b1. */
__global__ void __launch_bounds__(PE_SEL_THREADS)
    k_cand(pe_cuda_matrix m, const double *eff_ptr, double eff_val) {
    __shared__ uint32_t h_n[PE_NB1], h_s[PE_NB1], warp_n[PE_CAND_ROWS / 32], s_base;
    PE_STAMP0(m, 11);
    pe_pdl_wait();
    PE_STAMP0(m, 12);
    pe_pdl_launch();
    pe_cuda_state *st = m.state;
    const double eff = eff_ptr ? __ldcg(eff_ptr) : eff_val;
    { /* the histogram: independent 16-byte loads */
        const uint4 *src = (const uint4 *)m.hist;
        uint4 v[2 * PE_NB1 / 4 / PE_SEL_THREADS];
#pragma unroll
        for (int q = 0; q < 2 * PE_NB1 / 4 / PE_SEL_THREADS; q++)
            v[q] = __ldcg(src + q * PE_SEL_THREADS + threadIdx.x);
#pragma unroll
        for (int q = 0; q < 2 * PE_NB1 / 4 / PE_SEL_THREADS; q++) {
            int i = 4 * (q * PE_SEL_THREADS + threadIdx.x);
            uint32_t *dst = i < PE_NB1 ? h_n + i : h_s + (i - PE_NB1);
            dst[0] = v[q].x, dst[1] = v[q].y, dst[2] = v[q].z, dst[3] = v[q].w;
        }
    }
    __syncthreads();
    PE_STAMP0(m, 20); /* histogram loaded */
    const double budget = eff * (double)(m.n_in * m.n_out);
    const uint32_t mode = !(eff > 0.0)                  ? PE_MODE_NONE
                          : (double)m.total_w < budget ? PE_MODE_ALL
                                                       : PE_MODE_SEARCH;
    uint32_t b1 = 0, an = 0;
    uint64_t aw = 0;
    if (mode == PE_MODE_SEARCH)
        pe_pick_bin(h_n, h_s, PE_NB1, (uint64_t)((m.n_out + 15) / 16), budget, &b1, &aw, &an);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        st->mode = mode;
        st->b1 = b1;
        st->above_w = aw;
        st->above_n = an;
    }
    if (mode != PE_MODE_SEARCH) return;
    PE_STAMP0(m, 15); /* level-1 bin picked */
    const int tail = (int)(m.n_out % 16), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t r0 = (int64_t)blockIdx.x * PE_CAND_ROWS;
    uint32_t key[PE_CAND_ROWS / PE_SEL_THREADS];
#pragma unroll
    for (int q = 0; q < PE_CAND_ROWS / PE_SEL_THREADS; q++) {
        int64_t r = r0 + q * PE_SEL_THREADS + threadIdx.x;
        key[q] = r < m.n_rows ? m.keys[r] : 0xFFFFFFFFu;
    }
    constexpr int NQ = PE_CAND_ROWS / PE_SEL_THREADS, NW = PE_SEL_THREADS / 32;
    unsigned mask[NQ];
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        const int64_t r = r0 + q * PE_SEL_THREADS + threadIdx.x;
        mask[q] = __ballot_sync(0xFFFFFFFFu, r < m.n_rows && (key[q] >> 19) == b1);
        if (lane == 0) warp_n[q * NW + warp] = __popc(mask[q]);
    }
    __syncthreads();
    if (warp == 0) { /* offsets in (round, warp) order; one atomic per block */
        constexpr int PER = NQ * NW / 32;
        uint32_t c[PER], sum = 0;
#pragma unroll
        for (int k = 0; k < PER; k++) sum += (c[k] = warp_n[lane * PER + k]);
        uint32_t incl = sum;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
            if (lane >= d) incl += o;
        }
        uint32_t run = incl - sum;
#pragma unroll
        for (int k = 0; k < PER; k++) {
            warp_n[lane * PER + k] = run;
            run += c[k];
        }
        if (lane == 31) s_base = run ? atomicAdd(&st->n_cand, run) : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        if (mask[q] >> lane & 1u) {
            const int64_t r = r0 + q * PE_SEL_THREADS + threadIdx.x;
            m.cand[s_base + warp_n[q * NW + warp] + __popc(mask[q] & ((1u << lane) - 1))] =
                key[q] | (pe_is_short(r, m.n_in, tail) << 31);
        }
    }
    PE_STAMP_MAX(m, 13);
}

/* hist -> 0 (only for pe_cuda_select alone; the matmul kernel clears it otherwise). */
__global__ void k_clear(pe_cuda_matrix m) {
    pe_pdl_wait();
    for (int i = threadIdx.x; i < 2 * PE_NB1; i += blockDim.x) m.hist[i] = 0;
}

/* ---------------------------------------------------------------- launch */

int pe_cuda_select_impl(const pe_cuda_matrix *m, const void *x, int x_dtype,
                        const double *effort_ptr, double effort_val, void *stream, int pdl,
                        int stages) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cfg.blockDim = dim3(PE_SEL_THREADS);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = (cudaStream_t)stream;
    cfg.gridDim = dim3((unsigned)((m->n_rows + PE_KEY_ROWS - 1) / PE_KEY_ROWS));
    cudaError_t e;
    pe_cuda_matrix mm = *m;
    if (x_dtype == PE_F16)
        e = cudaLaunchKernelEx(&cfg, k_keys<__half>, (const __half *)x, mm);
    else if (x_dtype == PE_BF16)
        e = cudaLaunchKernelEx(&cfg, k_keys<__nv_bfloat16>, (const __nv_bfloat16 *)x, mm);
    else if (x_dtype == PE_F32)
        e = cudaLaunchKernelEx(&cfg, k_keys<float>, (const float *)x, mm);
    else
        return PE_CUDA_ERR_ARG;
    if (e != cudaSuccess) return (int)e;
    if (stages >= 2) {
        cfg.gridDim = dim3((unsigned)((m->n_rows + PE_CAND_ROWS - 1) / PE_CAND_ROWS));
        e = cudaLaunchKernelEx(&cfg, k_cand, mm, effort_ptr, effort_val);
        if (e != cudaSuccess) return (int)e;
    }
    if (stages >= 3) return 0; /* the matmul kernel follows and clears the histogram */
    cfg.gridDim = dim3(1);
    return (int)cudaLaunchKernelEx(&cfg, k_clear, mm);
}

/* Load the selection kernels now (not lazily inside a graph capture). */
int pe_cuda_select_init(void) {
    cudaFuncAttributes a;
    cudaError_t e = cudaFuncGetAttributes(&a, k_keys<float>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_keys<__half>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_keys<__nv_bfloat16>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_cand);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_clear);
    return (int)e;
}
