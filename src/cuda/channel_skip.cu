/* TEAL-style channel skipping (the peer of eval's `teal` rule): keep the k input rows of largest
 * |x_i| (ties: lower index first) and multiply by the dense fp16 rows of W (n_in, n_out),
 * row-major, reading only the kept rows. Two kernels per token: one block selects the rows
 * exactly (a radix select over the float bits of |x|) into an index-ordered list; then the
 * GEMV over the list (blocks (tile, split), splitk.cuh), launched with PDL after it. */
#include "splitk.cuh"

#define PE_SEL_THREADS 1024
#define PE_CS_COLS 256 /* columns per block: 8 per lane of a warp, one 16-byte load per row */
#define PE_CS_UNROLL 8 /* rows of a warp in flight */

/* |x_i| as ordered bits (x finite: non-negative floats order as their bits). */
template <typename TX>
__device__ __forceinline__ uint32_t pe_abs_key(const TX *x, int64_t i) {
    return __float_as_uint(pe_to_f32(x[i])) & 0x7FFFFFFFu;
}

/* Block-wide exclusive count of flag over the block's threads (in thread order); *total = the
 * block's count. PE_SEL_THREADS threads. */
__device__ __forceinline__ uint32_t pe_block_rank(bool flag, uint32_t *total) {
    __shared__ uint32_t s_w[PE_SEL_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned m = __ballot_sync(0xFFFFFFFFu, flag);
    if (lane == 0) s_w[warp] = __popc(m);
    __syncthreads();
    uint32_t before = 0, all = 0;
    for (int w = 0; w < PE_SEL_THREADS / 32; w++) {
        before += w < warp ? s_w[w] : 0u;
        all += s_w[w];
    }
    __syncthreads();
    *total = all;
    return before + __popc(m & ((1u << lane) - 1u));
}

/* x (n_in,) -> rows (k,) and xs (k,): the k rows of largest |x_i| (0 < k <= n_in), ties by
 * lower index, in index order, with their x. One block of PE_SEL_THREADS threads: 4 passes of
 * 8 key bits (a 256-bin histogram each) find the k-th largest key T and how many keys equal
 * to T are taken; then one compaction pass in index order. */
template <typename TX>
__global__ void __launch_bounds__(PE_SEL_THREADS)
    k_select_rows(const TX *__restrict__ x, int64_t n_in, int64_t k, int32_t *rows, float *xs) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_bin, s_above;
    const int lane = threadIdx.x & 31;
    pe_pdl_wait();
    pe_pdl_launch();
    uint32_t prefix = 0, mask = 0, need = (uint32_t)k; /* need: keys to take with the prefix */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += PE_SEL_THREADS) hist[i] = 0u;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < n_in; i += PE_SEL_THREADS) {
            const uint32_t key = pe_abs_key(x, i);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x < 32) { /* lane l: bins 255 - 8 l down to 248 - 8 l */
            uint32_t mine = 0;
#pragma unroll
            for (int q = 0; q < 8; q++) mine += hist[255 - 8 * lane - q];
            uint32_t incl = mine;
#pragma unroll
            for (int d = 1; d < 32; d *= 2) {
                const uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
                if (lane >= d) incl += o;
            }
            uint32_t above = incl - mine; /* keys in higher bins than mine */
            if (above < need && incl >= need) { /* one lane: the bin reaching need is here */
                for (int q = 0; q < 8; q++) {
                    const uint32_t h = hist[255 - 8 * lane - q];
                    if (above + h >= need) {
                        s_bin = 255u - 8u * lane - q;
                        s_above = above;
                        break;
                    }
                    above += h;
                }
            }
        }
        __syncthreads();
        prefix |= s_bin << shift;
        mask |= 255u << shift;
        need -= s_above;
        __syncthreads();
    }
    /* keys > prefix are taken, and the first `need` keys == prefix in index order */
    uint32_t out = 0, eq_seen = 0;
    for (int64_t base = 0; base < n_in; base += PE_SEL_THREADS) {
        const int64_t i = base + threadIdx.x;
        const uint32_t key = i < n_in ? pe_abs_key(x, i) : 0u;
        const bool gt = i < n_in && key > prefix, eq = i < n_in && key == prefix;
        uint32_t n_gt, n_eq;
        const uint32_t r_gt = pe_block_rank(gt, &n_gt), r_eq = pe_block_rank(eq, &n_eq);
        const uint32_t left = need > eq_seen ? need - eq_seen : 0u; /* ties still to take */
        const bool take = gt || (eq && r_eq < left);
        if (take) {
            const uint32_t o = out + r_gt + min(r_eq, left);
            rows[o] = (int32_t)i;
            xs[o] = pe_to_f32(x[i]);
        }
        out += n_gt + min(n_eq, left);
        eq_seen += n_eq;
    }
}

/* 8 fp16 weights of row r from column c (VEC: one 16-byte load, n_out % 8 == 0). */
template <bool VEC>
__device__ __forceinline__ void pe_f16_load8(const __half *w, int64_t r, int64_t c, int64_t n_out,
                                             float (&v)[8]) {
    if (VEC) {
        const uint4 u = __ldg(reinterpret_cast<const uint4 *>(w + r * n_out + c));
        const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 f = __half22float2(h[e]);
            v[2 * e] = f.x, v[2 * e + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = c + e < n_out ? __half2float(w[r * n_out + c + e]) : 0.f;
    }
}

/* sum over list entries j of xs[j] * W[rows[j], :] -> y (n_out,). Grid (tiles, n_split); split s
 * takes entries s * per .. (s + 1) * per - 1 of the k, warp w every 8th of them. */
template <typename TY, bool VEC>
__global__ void __launch_bounds__(PE_DENSE_THREADS)
    k_rows_f16(const int32_t *__restrict__ rows, const float *__restrict__ xs, int64_t k,
               const __half *__restrict__ w, int64_t n_out, int per, pe_splitk sk, TY *y) {
    __shared__ float red[PE_DENSE_WARPS][PE_CS_COLS + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = blockIdx.x, split = blockIdx.y, n_split = gridDim.y;
    const int64_t c0 = (int64_t)tile * PE_CS_COLS, c = c0 + 8 * lane;
    const int64_t j_end = min(k, (int64_t)(split + 1) * per);
    constexpr int STEP = PE_DENSE_WARPS * PE_CS_UNROLL;
    pe_pdl_wait(); /* the list of the select kernel */
    pe_pdl_launch();
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c < n_out) {
        for (int64_t j0 = (int64_t)split * per + warp; j0 < j_end; j0 += STEP) {
            float v[PE_CS_UNROLL][8], xv[PE_CS_UNROLL];
#pragma unroll
            for (int u = 0; u < PE_CS_UNROLL; u++) {
                const int64_t j = j0 + u * PE_DENSE_WARPS;
                xv[u] = 0.f;
                if (j < j_end) {
                    pe_f16_load8<VEC>(w, __ldg(rows + j), c, n_out, v[u]);
                    xv[u] = __ldg(xs + j);
                }
            }
#pragma unroll
            for (int u = 0; u < PE_CS_UNROLL; u++) {
                if (j0 + u * PE_DENSE_WARPS >= j_end) break;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = __fmaf_rn(xv[u], v[u][e], acc[e]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) red[warp][8 * lane + e] = acc[e];
    __syncthreads();
    float s = 0.f;
    for (int q = 0; q < PE_DENSE_WARPS; q++) s += red[q][threadIdx.x];
    pe_splitk_store(sk, tile, split, n_split, c0, PE_CS_COLS, n_out, s, y);
}

/* Zero y (k == 0: nothing kept). */
template <typename TY>
__global__ void k_zero(TY *y, int64_t n) {
    pe_pdl_wait();
    pe_pdl_launch();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        pe_store(&y[i], 0.f);
}

template <typename TX, typename TY>
static cudaError_t channel_skip_typed(const void *x, int64_t n_in, int64_t k, const __half *w,
                                      int64_t n_out, int n_split, int32_t *rows, float *xs,
                                      pe_splitk sk, void *y, void *stream, int pdl) {
    if (k == 0)
        return pe_launch_dense(k_zero<TY>, dim3((unsigned)((n_out + 255) / 256)), stream, pdl,
                               (TY *)y, n_out);
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(PE_SEL_THREADS);
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, k_select_rows<TX>, (const TX *)x, n_in, k, rows, xs);
    if (e != cudaSuccess) return e;
    const int per = (int)((k + n_split - 1) / n_split);
    const dim3 grid((unsigned)((n_out + PE_CS_COLS - 1) / PE_CS_COLS), (unsigned)n_split);
    if (n_out % 8 == 0)
        return pe_launch_dense(k_rows_f16<TY, true>, grid, stream, pdl, (const int32_t *)rows,
                               (const float *)xs, k, w, n_out, per, sk, (TY *)y);
    return pe_launch_dense(k_rows_f16<TY, false>, grid, stream, pdl, (const int32_t *)rows,
                           (const float *)xs, k, w, n_out, per, sk, (TY *)y);
}

extern "C" int pe_cuda_channel_skip(const void *x, int x_dtype, int64_t n_tokens, int64_t k,
                                    const uint16_t *w, int64_t n_in, int64_t n_out, int n_split,
                                    int32_t *rows, float *xs, float *partial, uint32_t *count,
                                    void *y, int y_dtype, void *stream, int pdl) {
    if (n_tokens < 0 || n_in < 1 || n_out < 1 || k < 0 || k > n_in || n_split < 1 || !w ||
        !rows || !xs || !y || (n_split > 1 && (!partial || !count)))
        return PE_CUDA_ERR_ARG;
    const pe_splitk sk = {partial, count};
    const __half *wh = (const __half *)w;
    const int xsz = x_dtype == PE_F32 ? 4 : 2, ysz = y_dtype == PE_F32 ? 4 : 2;
    for (int64_t t = 0; t < n_tokens; t++) {
        const char *xt = (const char *)x + t * n_in * xsz;
        char *yt = (char *)y + t * n_out * ysz;
        cudaError_t e;
#define PE_CS(TX, TY) \
    channel_skip_typed<TX, TY>(xt, n_in, k, wh, n_out, n_split, rows, xs, sk, yt, stream, pdl)
        if (x_dtype == PE_F16 && y_dtype == PE_F32) e = PE_CS(__half, float);
        else if (x_dtype == PE_F16 && y_dtype == PE_F16) e = PE_CS(__half, __half);
        else if (x_dtype == PE_F32 && y_dtype == PE_F32) e = PE_CS(float, float);
        else if (x_dtype == PE_BF16 && y_dtype == PE_F32) e = PE_CS(__nv_bfloat16, float);
        else if (x_dtype == PE_BF16 && y_dtype == PE_BF16) e = PE_CS(__nv_bfloat16, __nv_bfloat16);
        else return PE_CUDA_ERR_ARG;
#undef PE_CS
        if (e != cudaSuccess) return e == cudaErrorInvalidValue ? PE_CUDA_ERR_ARG : PE_CUDA_ERR_DEVICE + (int)e;
    }
    return PE_CUDA_OK;
}
