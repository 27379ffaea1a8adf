/* Cutoff selection on the device (reference.cutoff): an exact three-level radix search over the
 * float bits of s = |x[order[r]]| * stats[r], weighted by the row multiplications. Two kernels:
 * k_keys (keys, level-1 histogram; its last block picks the level-1 bin) and k_cand (rows in
 * that bin become candidates; its last block resolves levels 2 and 3 and writes the cutoff).
 * Integer atomics only: the cutoff does not depend on the order blocks run in. */
#include "common.cuh"

#define PE_ROWS_PER_BLOCK 512 /* one row per thread: no dependent load chains */

/* x (n_in,) -> keys (n_rows,), hist (2, PE_NB1) += level-1 counts; last block: mode, b1. */
template <typename TX>
__global__ void __launch_bounds__(PE_SEL_THREADS)
    k_keys(const TX *__restrict__ x, pe_cuda_matrix m, const double *eff_ptr, double eff_val) {
    __shared__ uint32_t h_n[PE_NB1], h_s[PE_NB1];
    __shared__ bool last;
    for (int b = threadIdx.x; b < PE_NB1; b += blockDim.x) h_n[b] = h_s[b] = 0;
    pe_pdl_wait();
    pe_pdl_launch();
    __syncthreads();
    const int tail = (int)(m.n_out % 16);
    const int64_t r0 = (int64_t)blockIdx.x * PE_ROWS_PER_BLOCK;
    const int64_t r1 = min(r0 + PE_ROWS_PER_BLOCK, m.n_rows);
    for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
        float xv = pe_to_f32(x[m.order[r]]);
        float s = __fmul_rn(fabsf(xv), m.stats[r]);
        uint32_t key = __float_as_uint(s) & 0x7FFFFFFFu;
        m.keys[r] = key;
        m.xval[r] = xv;
        atomicAdd(&h_n[key >> 19], 1u);
        if (pe_is_short(r, m.n_in, tail)) atomicAdd(&h_s[key >> 19], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < PE_NB1; b += blockDim.x) {
        if (h_n[b]) atomicAdd(&m.hist[b], h_n[b]);
        if (h_s[b]) atomicAdd(&m.hist[PE_NB1 + b], h_s[b]);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&m.state->ticket1, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int b = threadIdx.x; b < PE_NB1; b += blockDim.x) {
        h_n[b] = __ldcg(&m.hist[b]);
        h_s[b] = __ldcg(&m.hist[PE_NB1 + b]);
        m.hist[b] = 0;
        m.hist[PE_NB1 + b] = 0;
    }
    __syncthreads();
    const double eff = eff_ptr ? *eff_ptr : eff_val;
    const double budget = eff * (double)(m.n_in * m.n_out);
    pe_cuda_state *st = m.state;
    uint32_t mode = !(eff > 0.0) ? PE_MODE_NONE
                    : (double)m.total_w < budget ? PE_MODE_ALL
                                                 : PE_MODE_SEARCH;
    uint32_t bin = 0, an = 0;
    uint64_t aw = 0;
    if (mode == PE_MODE_SEARCH)
        pe_pick_bin(h_n, h_s, PE_NB1, (uint64_t)((m.n_out + 15) / 16), budget, &bin, &aw, &an);
    if (threadIdx.x == 0) {
        st->mode = mode;
        st->b1 = bin;
        st->above_w = aw;
        st->above_n = an;
        st->ticket1 = 0;
    }
}

#define PE_CAND_SMEM 8192 /* candidates the resolving block holds in shared memory at once */

/* Last block of k_cand: levels 2 and 3 over the candidate list -> st->cut, mults, rows. */
__device__ void resolve(pe_cuda_matrix m, double budget) {
    __shared__ uint32_t h_n[PE_NB2], h_s[PE_NB2], s_cand[PE_CAND_SMEM];
    pe_cuda_state *st = m.state;
    const uint32_t n_c = __ldcg(&st->n_cand);
    const uint64_t G = (uint64_t)((m.n_out + 15) / 16);
    uint64_t aw = __ldcg(&st->above_w);
    uint32_t an = __ldcg(&st->above_n), prefix = __ldcg(&st->b1) << 19, b = 0;
    for (int level = 0; level < 2; level++) {
        const int shift = level == 0 ? 9 : 0, nb = level == 0 ? PE_NB2 : PE_NB3;
        const uint32_t hi_mask = level == 0 ? 0xFFF80000u : 0xFFFFFE00u;
        for (int i = threadIdx.x; i < PE_NB2; i += blockDim.x) h_n[i] = h_s[i] = 0;
        for (uint32_t base = 0; base < n_c; base += PE_CAND_SMEM) {
            const uint32_t cnt = min(n_c - base, (uint32_t)PE_CAND_SMEM);
            if (level == 0 || n_c > PE_CAND_SMEM) {
                __syncthreads();
#pragma unroll 4
                for (uint32_t i = threadIdx.x; i < cnt; i += blockDim.x)
                    s_cand[i] = __ldcg(&m.cand[base + i]);
            }
            __syncthreads();
            for (uint32_t i = threadIdx.x; i < cnt; i += blockDim.x) {
                uint32_t e = s_cand[i], key = e & 0x7FFFFFFFu;
                if ((key & hi_mask) != prefix) continue;
                uint32_t bin = (key >> shift) & (uint32_t)(nb - 1);
                atomicAdd(&h_n[bin], 1u);
                if (e >> 31) atomicAdd(&h_s[bin], 1u);
            }
        }
        __syncthreads();
        pe_pick_bin(h_n, h_s, nb, G, budget, &b, &aw, &an);
        prefix |= b << shift;
    }
    if (threadIdx.x == 0) {
        st->cut = prefix;
        st->mults = aw + (uint64_t)h_n[b] * G - h_s[b];
        st->rows = an + h_n[b];
    }
}

/* keys -> candidates (rows in level-1 bin b1); last block: the cutoff. */
__global__ void __launch_bounds__(PE_SEL_THREADS)
    k_cand(pe_cuda_matrix m, const double *eff_ptr, double eff_val) {
    __shared__ bool last;
    pe_pdl_wait();
    pe_pdl_launch();
    pe_cuda_state *st = m.state;
    const uint32_t mode = st->mode, b1 = st->b1;
    const int tail = (int)(m.n_out % 16);
    const int lane = threadIdx.x & 31;
    if (mode == PE_MODE_SEARCH) { /* one row per thread; one atomic per block */
        __shared__ uint32_t warp_n[PE_SEL_THREADS / 32], s_base;
        const int warp = threadIdx.x >> 5;
        const int64_t r = (int64_t)blockIdx.x * PE_ROWS_PER_BLOCK + threadIdx.x;
        const uint32_t key = r < m.n_rows ? m.keys[r] : 0xFFFFFFFFu;
        const bool hit = r < m.n_rows && (key >> 19) == b1;
        const unsigned mask = __ballot_sync(0xFFFFFFFFu, hit);
        if (lane == 0) warp_n[warp] = __popc(mask);
        __syncthreads();
        uint32_t off = 0, total = 0;
        for (int w = 0; w < PE_SEL_THREADS / 32; w++) {
            off += w < warp ? warp_n[w] : 0u;
            total += warp_n[w];
        }
        if (threadIdx.x == 0 && total) s_base = atomicAdd(&st->n_cand, total);
        __syncthreads();
        if (hit)
            m.cand[s_base + off + __popc(mask & ((1u << lane) - 1))] =
                key | (pe_is_short(r, m.n_in, tail) << 31);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&st->ticket2, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (mode == PE_MODE_SEARCH) {
        const double eff = eff_ptr ? *eff_ptr : eff_val;
        resolve(m, eff * (double)(m.n_in * m.n_out));
    } else if (threadIdx.x == 0) {
        bool all = mode == PE_MODE_ALL;
        st->cut = all ? 0u : 0xFFFFFFFFu;
        st->mults = all ? m.total_w : 0ull;
        st->rows = all ? (uint32_t)m.n_rows : 0u;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        st->info_mults += st->mults;
        st->info_rows += st->rows;
        st->n_cand = 0;
        st->ticket2 = 0;
    }
}

/* ---------------------------------------------------------------- launch */

static int launch_cfg(cudaLaunchConfig_t *cfg, cudaLaunchAttribute *attr, unsigned grid,
                      unsigned block, size_t smem, void *stream, int pdl) {
    cfg->gridDim = dim3(grid);
    cfg->blockDim = dim3(block);
    cfg->dynamicSmemBytes = smem;
    cfg->stream = (cudaStream_t)stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg->attrs = attr;
    cfg->numAttrs = pdl ? 1 : 0;
    return 0;
}

int pe_cuda_select_impl(const pe_cuda_matrix *m, const void *x, int x_dtype,
                        const double *effort_ptr, double effort_val, void *stream, int pdl,
                        int stages) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    unsigned grid = (unsigned)((m->n_rows + PE_ROWS_PER_BLOCK - 1) / PE_ROWS_PER_BLOCK);
    launch_cfg(&cfg, attr, grid, PE_SEL_THREADS, 0, stream, pdl);
    cudaError_t e;
    pe_cuda_matrix mm = *m;
    if (x_dtype == PE_F16)
        e = cudaLaunchKernelEx(&cfg, k_keys<__half>, (const __half *)x, mm, effort_ptr, effort_val);
    else if (x_dtype == PE_BF16)
        e = cudaLaunchKernelEx(&cfg, k_keys<__nv_bfloat16>, (const __nv_bfloat16 *)x, mm,
                               effort_ptr, effort_val);
    else if (x_dtype == PE_F32)
        e = cudaLaunchKernelEx(&cfg, k_keys<float>, (const float *)x, mm, effort_ptr, effort_val);
    else
        return PE_CUDA_ERR_ARG;
    if (e != cudaSuccess || stages < 2) return (int)e;
    e = cudaLaunchKernelEx(&cfg, k_cand, mm, effort_ptr, effort_val);
    return (int)e;
}

/* Load the selection kernels now (not lazily inside a graph capture). */
int pe_cuda_select_init(void) {
    cudaFuncAttributes a;
    cudaError_t e = cudaFuncGetAttributes(&a, k_keys<float>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_keys<__half>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_keys<__nv_bfloat16>);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&a, k_cand);
    return (int)e;
}
