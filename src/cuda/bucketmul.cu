/* The effort matmul on the device: rows with key >= cut, tile-major repacked, scattered into
 * shared-memory accumulators. Grid: n_tiles column tiles x n_splits row splits (rows go to
 * splits in 32-row stripes, so the work of every split is a fair sample). Every output is summed
 * in a fixed order (rows in list order per team, teams in order, splits in order): the same
 * inputs give the same bits. */
#include "common.cuh"
#include "resolve.cuh"

#include <stddef.h>

#define PE_MM_THREADS 512
#define PE_MM_WARPS (PE_MM_THREADS / 32)
#define PE_LIST_CAP 8192 /* dispatched rows held in shared memory at a time */
#define PE_UNROLL 8      /* rows per load batch of a team (two batches in flight) */
#define PE_ROUNDS 8      /* key rounds loaded at once in the dispatch scan */

static_assert(offsetof(pe_cuda_state, mode) == 12 && offsetof(pe_cuda_state, b1) == 16 &&
                  offsetof(pe_cuda_state, above_n) == 24 && sizeof(pe_cuda_state) == 64,
              "k_bucketmul reads the state as two uint4 words");

template <int CT>
struct Tile {
    static constexpr int TPT = CT / 4;              /* threads per team, 4 groups each      */
    static constexpr int NT = PE_MM_THREADS / TPT;  /* teams per block                      */
    static constexpr int ACC = 16 * CT + TPT;       /* floats per team (padded: no conflicts) */
    static constexpr int CB = CT * 5 / 2;           /* bytes of one row's chunk in a tile   */
    static constexpr size_t SMEM = sizeof(float) * NT * ACC + 4 * PE_LIST_CAP;
};

/* Loads of U list entries (rows j0, j0 + NT, ...) of a team: values, nibbles and x. */
template <int CT>
__device__ __forceinline__ void load_rows(const int *list_r, uint32_t n, uint32_t j0,
                                          const uint8_t *tile_base, const float *xval, int t,
                                          uint2 (&v)[PE_UNROLL], uint32_t (&p)[PE_UNROLL],
                                          float (&xv)[PE_UNROLL]) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < PE_UNROLL; u++) {
        uint32_t j = j0 + u * T::NT;
        v[u] = make_uint2(0u, 0u);
        p[u] = 0u;
        xv[u] = 0.f;
        if (j < n) {
            const int r = list_r[j];
            const uint8_t *c = tile_base + (size_t)r * T::CB;
            v[u] = __ldg((const uint2 *)(c + 8 * t));
            p[u] = __ldg((const unsigned short *)(c + 2 * CT + 2 * t));
            xv[u] = __ldg(xval + r);
        }
    }
}

/* acc[16 g + pos] += x * w for the loaded entries that exist (j < n). */
template <int CT>
__device__ __forceinline__ void add_rows(uint32_t n, uint32_t j0, float *my,
                                         const uint2 (&v)[PE_UNROLL],
                                         const uint32_t (&p)[PE_UNROLL],
                                         const float (&xv)[PE_UNROLL]) {
    typedef Tile<CT> T;
#pragma unroll
    for (int u = 0; u < PE_UNROLL; u++) {
        if (j0 + u * T::NT >= n) break;
        float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v[u].x));
        float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&v[u].y));
        my[((p[u] >> 0) & 15) * CT + 0 * T::TPT] += xv[u] * a.x;
        my[((p[u] >> 4) & 15) * CT + 1 * T::TPT] += xv[u] * a.y;
        my[((p[u] >> 8) & 15) * CT + 2 * T::TPT] += xv[u] * b.x;
        my[((p[u] >> 12) & 15) * CT + 3 * T::TPT] += xv[u] * b.y;
    }
}

/* list (n rows of this split) -> team accumulators; the next U rows load while U add. */
template <int CT>
__device__ __forceinline__ void process(const int *list_r, uint32_t n, const uint8_t *tile_base,
                                        const float *xval, float *my, int team, int t) {
    constexpr uint32_t STEP = Tile<CT>::NT * PE_UNROLL;
    uint2 v0[PE_UNROLL], v1[PE_UNROLL];
    uint32_t p0[PE_UNROLL], p1[PE_UNROLL];
    float x0[PE_UNROLL], x1[PE_UNROLL];
    load_rows<CT>(list_r, n, team, tile_base, xval, t, v0, p0, x0);
    for (uint32_t j0 = team; j0 < n; j0 += 2 * STEP) {
        load_rows<CT>(list_r, n, j0 + STEP, tile_base, xval, t, v1, p1, x1);
        add_rows<CT>(n, j0, my, v0, p0, x0);
        if (j0 + STEP >= n) break;
        load_rows<CT>(list_r, n, j0 + 2 * STEP, tile_base, xval, t, v0, p0, x0);
        add_rows<CT>(n, j0 + STEP, my, v1, p1, x1);
    }
}

/* x (n_in,) @ rows with key >= state.cut -> y (n_out,) (via partial sums when n_splits > 1). */
/* Output column (inside a tile) of accumulator slot o = pos * CT + e * TPT + t: group 4t + e. */
template <int CT>
__device__ __forceinline__ int slot_col(int o) {
    constexpr int TPT = CT / 4;
    const int pos = o / CT, rem = o % CT;
    return 16 * (4 * (rem % TPT) + rem / TPT) + pos;
}

/* Sum of the n_splits partial tiles (slot order) -> y (fixed order over splits); VEC slots per
 * thread, 16 loads in flight. Run by the last block of a tile to finish. */
template <typename TY, int CT>
__device__ __forceinline__ void sum_splits(const pe_cuda_matrix &m, int tile, TY *y) {
    constexpr int VEC = 16 * CT / PE_MM_THREADS, DEPTH = 16;
    const size_t split_stride = (size_t)m.n_tiles * 16 * CT;
    const int o0 = threadIdx.x * VEC;
    const float *p = m.partial + (size_t)tile * 16 * CT + o0;
    float s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; k++) s[k] = 0.f;
    for (int sp = 0; sp < m.n_splits; sp += DEPTH) {
        float v[DEPTH][VEC];
#pragma unroll
        for (int u = 0; u < DEPTH; u++)
#pragma unroll
            for (int k = 0; k < VEC; k++)
                v[u][k] = sp + u < m.n_splits ? __ldcg(p + (size_t)(sp + u) * split_stride + k) : 0.f;
#pragma unroll
        for (int u = 0; u < DEPTH; u++)
#pragma unroll
            for (int k = 0; k < VEC; k++) s[k] += v[u][k];
    }
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        int64_t gc = (int64_t)tile * 16 * CT + slot_col<CT>(o0 + k);
        if (gc < m.n_out) pe_store(&y[gc], s[k]);
    }
}

/* x (n_in,) @ rows with key >= cut -> y (n_out,) (via partial sums when n_splits > 1). Every
 * block first finishes the cutoff search (resolve.cuh); block 0 records it. */
template <typename TX, typename TY, int CT>
__global__ void __launch_bounds__(PE_MM_THREADS, 1)
    k_bucketmul(const TX *__restrict__ x, pe_cuda_matrix m, TY *__restrict__ y,
                const double *eff_ptr, double eff_val) {
    typedef Tile<CT> T;
    extern __shared__ float smem[];
    float *acc = smem;                           /* (NT, ACC)   */
    int *list_r = (int *)(acc + T::NT * T::ACC); /* (LIST_CAP,) */
    __shared__ uint32_t warp_n[PE_ROUNDS * PE_MM_WARPS], s_total;
    __shared__ bool last;
    const int tile = blockIdx.x % m.n_tiles, split = blockIdx.x / m.n_tiles;
#define PE_STAMP(i) PE_STAMP0(m, i)
    PE_STAMP(0);
    for (int i = threadIdx.x; i < T::NT * T::ACC; i += PE_MM_THREADS) acc[i] = 0.f;
    pe_pdl_wait();
    PE_STAMP(1);
    pe_pdl_launch();
    pe_cuda_state *st = m.state;
    if (blockIdx.x == 0) /* the candidate kernel is done with the histogram: clear it */
        for (int i = threadIdx.x; i < 2 * PE_NB1; i += PE_MM_THREADS) m.hist[i] = 0;
    const int64_t stride = m.n_splits;
#pragma unroll
    for (int q = 0; q < PE_ROUNDS; q++) { /* the first keys of the dispatch scan, into L1 */
        int64_t r = (split + (q * PE_MM_WARPS + (threadIdx.x >> 5)) * stride) * 32 + (threadIdx.x & 31);
        if (r < m.n_rows) asm volatile("prefetch.global.L1 [%0];" ::"l"(m.keys + r));
    }
    /* the state and the effort in one round trip: (ticket1, ticket2, n_cand, mode),
     * (b1, cut, above_n, rows), above_w */
    const uint4 s0 = __ldcg((const uint4 *)st), s1 = __ldcg((const uint4 *)st + 1);
    const unsigned long long above_w = __ldcg(&st->above_w);
    const double eff = eff_ptr ? __ldcg(eff_ptr) : eff_val;
    const uint32_t mode = s0.w;
    PE_STAMP(16); /* state loaded */
    uint32_t cut, rows;
    unsigned long long mults;
    if (mode == PE_MODE_SEARCH) {
        cut = pe_resolve(m, eff * (double)(m.n_in * m.n_out), s0.z, s1.x, above_w, s1.z,
                         (uint32_t *)list_r, &mults, &rows);
    } else {
        const bool all = mode == PE_MODE_ALL;
        cut = all ? 0u : 0xFFFFFFFFu;
        mults = all ? m.total_w : 0ull;
        rows = all ? (uint32_t)m.n_rows : 0u;
    }
    PE_STAMP(2);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        st->cut = cut;
        st->mults = mults;
        st->rows = rows;
        st->info_mults += mults;
        st->info_rows += rows;
    }
    const int team = threadIdx.x / T::TPT, t = threadIdx.x % T::TPT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *my = acc + team * T::ACC + t;
    const uint8_t *tile_base = m.wt + (size_t)tile * (size_t)m.n_rows * T::CB;
    const int64_t n_stripes = (m.n_rows + 31) / 32;
    /* stripes of 32 rows: split s owns stripes s, s + stride, ...; warp w takes the w-th of
     * each round of PE_MM_WARPS stripes; PE_ROUNDS rounds are scanned at once. */
    uint32_t n = 0;
    __syncthreads();
    for (int64_t round0 = split; round0 < n_stripes; round0 += PE_ROUNDS * PE_MM_WARPS * stride) {
        if (n + PE_ROUNDS * PE_MM_THREADS > PE_LIST_CAP) { /* no room: use the list first */
            process<CT>(list_r, n, tile_base, m.xval, my, team, t);
            __syncthreads();
            n = 0;
        }
        uint32_t key[PE_ROUNDS];
        unsigned mask[PE_ROUNDS];
#pragma unroll
        for (int q = 0; q < PE_ROUNDS; q++) {
            int64_t r = (round0 + (q * PE_MM_WARPS + warp) * stride) * 32 + lane;
            key[q] = r < m.n_rows ? __ldg(&m.keys[r]) : 0u;
        }
#pragma unroll
        for (int q = 0; q < PE_ROUNDS; q++) {
            int64_t r = (round0 + (q * PE_MM_WARPS + warp) * stride) * 32 + lane;
            mask[q] = __ballot_sync(0xFFFFFFFFu, r < m.n_rows && key[q] >= cut);
            if (lane == 0) warp_n[q * PE_MM_WARPS + warp] = __popc(mask[q]);
        }
        __syncthreads();
        if (warp == 0) { /* exclusive prefix over (round, warp), PE_ROUNDS * 16 / 32 each */
            constexpr int PER = PE_ROUNDS * PE_MM_WARPS / 32;
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
            if (lane == 31) s_total = run;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < PE_ROUNDS; q++) {
            if (mask[q] >> lane & 1u) {
                int64_t r = (round0 + (q * PE_MM_WARPS + warp) * stride) * 32 + lane;
                list_r[n + warp_n[q * PE_MM_WARPS + warp] + __popc(mask[q] & ((1u << lane) - 1))] =
                    (int)r;
            }
        }
        n += s_total;
        __syncthreads();
    }
    PE_STAMP(3);
    process<CT>(list_r, n, tile_base, m.xval, my, team, t);
    __syncthreads();
    PE_STAMP(4);
    /* teams -> this split's sums, in slot order (coalesced partial writes) */
    const int tile_cols = 16 * CT;
    float *part = m.partial + ((size_t)split * m.n_tiles + tile) * tile_cols;
    for (int o = threadIdx.x; o < tile_cols; o += PE_MM_THREADS) {
        float s = 0.f;
        for (int j = 0; j < T::NT; j++) s += acc[j * T::ACC + o];
        if (m.n_splits == 1) {
            int64_t gc = (int64_t)tile * tile_cols + slot_col<CT>(o);
            if (gc < m.n_out) pe_store(&y[gc], s);
        } else {
            part[o] = s;
        }
    }
    PE_STAMP(5);
    if (m.n_splits == 1) return;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&m.tickets[tile], 1u) == (uint32_t)m.n_splits - 1;
    __syncthreads();
    PE_STAMP(6);
    if (!last) {
        PE_STAMP_MAX(m, 14);
        return;
    }
    __threadfence();
    sum_splits<TY, CT>(m, tile, y);
    PE_STAMP_MAX(m, 7);
    if (threadIdx.x == 0) m.tickets[tile] = 0;
}

/* ---------------------------------------------------------------- launch */

int pe_cuda_select_impl(const pe_cuda_matrix *m, const void *x, int x_dtype,
                        const double *effort_ptr, double effort_val, void *stream, int pdl,
                        int stages);

template <typename TX, typename TY, int CT>
static cudaError_t launch_mm(const pe_cuda_matrix *m, const void *x, void *y, void *stream,
                             int pdl, const double *effort_ptr, double effort_val) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    cfg.gridDim = dim3((unsigned)(m->n_tiles * m->n_splits));
    cfg.blockDim = dim3(PE_MM_THREADS);
    cfg.dynamicSmemBytes = Tile<CT>::SMEM;
    cfg.stream = (cudaStream_t)stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, k_bucketmul<TX, TY, CT>, (const TX *)x, *m, (TY *)y,
                              effort_ptr, effort_val);
}

template <typename TX, typename TY>
static cudaError_t launch_ct(const pe_cuda_matrix *m, const void *x, void *y, void *stream,
                             int pdl, const double *ep, double ev) {
    switch (m->ct) {
        case 32: return launch_mm<TX, TY, 32>(m, x, y, stream, pdl, ep, ev);
        case 64: return launch_mm<TX, TY, 64>(m, x, y, stream, pdl, ep, ev);
        case 128: return launch_mm<TX, TY, 128>(m, x, y, stream, pdl, ep, ev);
        default: return cudaErrorInvalidValue;
    }
}

template <typename TX, typename TY, int CT>
static cudaError_t raise_smem() {
    return cudaFuncSetAttribute(k_bucketmul<TX, TY, CT>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tile<CT>::SMEM);
}

template <typename TX, typename TY>
static cudaError_t raise_all() {
    cudaError_t e = raise_smem<TX, TY, 32>();
    if (e == cudaSuccess) e = raise_smem<TX, TY, 64>();
    if (e == cudaSuccess) e = raise_smem<TX, TY, 128>();
    return e;
}

int pe_cuda_select_init(void);

extern "C" int pe_cuda_init(void) {
    int st = pe_cuda_select_init();
    if (st) return st;
    cudaError_t e = raise_all<float, float>();
    if (e == cudaSuccess) e = raise_all<__half, float>();
    if (e == cudaSuccess) e = raise_all<__half, __half>();
    if (e == cudaSuccess) e = raise_all<__nv_bfloat16, float>();
    if (e == cudaSuccess) e = raise_all<__nv_bfloat16, __nv_bfloat16>();
    return (int)e;
}

static int elem_size(int dtype) { return dtype == PE_F32 ? 4 : 2; }

static cudaError_t launch_types(const pe_cuda_matrix *m, const void *x, int xd, void *y, int yd,
                                void *stream, int pdl, const double *ep, double ev) {
    if (xd == PE_F32 && yd == PE_F32) return launch_ct<float, float>(m, x, y, stream, pdl, ep, ev);
    if (xd == PE_F16 && yd == PE_F32) return launch_ct<__half, float>(m, x, y, stream, pdl, ep, ev);
    if (xd == PE_F16 && yd == PE_F16) return launch_ct<__half, __half>(m, x, y, stream, pdl, ep, ev);
    if (xd == PE_BF16 && yd == PE_F32) return launch_ct<__nv_bfloat16, float>(m, x, y, stream, pdl, ep, ev);
    if (xd == PE_BF16 && yd == PE_BF16)
        return launch_ct<__nv_bfloat16, __nv_bfloat16>(m, x, y, stream, pdl, ep, ev);
    return cudaErrorInvalidValue;
}

extern "C" int pe_cuda_matmul(const pe_cuda_matrix *m, const void *x, int x_dtype,
                              int64_t n_tokens, const double *effort_ptr, double effort_val,
                              void *y, int y_dtype, void *stream, int pdl) {
    if (!m || m->n_rows < 1 || m->n_rows > 16 * m->n_in || m->n_splits < 1 || n_tokens < 0 ||
        (int64_t)m->n_tiles * 16 * m->ct < m->n_out)
        return PE_CUDA_ERR_ARG;
    for (int64_t t = 0; t < n_tokens; t++) {
        const char *xt = (const char *)x + t * m->n_in * elem_size(x_dtype);
        char *yt = (char *)y + t * m->n_out * elem_size(y_dtype);
        int st = pe_cuda_select_impl(m, xt, x_dtype, effort_ptr, effort_val, stream, pdl, 3);
        if (st) return st;
        cudaError_t e =
            launch_types(m, xt, x_dtype, yt, y_dtype, stream, pdl, effort_ptr, effort_val);
        if (e != cudaSuccess) return e == cudaErrorInvalidValue ? PE_CUDA_ERR_ARG : (int)e;
    }
    return 0;
}

extern "C" int pe_cuda_select(const pe_cuda_matrix *m, const void *x, int x_dtype,
                              const double *effort_ptr, double effort_val, void *stream,
                              int pdl, int stages) {
    return pe_cuda_select_impl(m, x, x_dtype, effort_ptr, effort_val, stream, pdl, stages);
}

extern "C" int pe_cuda_num_sms(void) {
    int dev = 0, n = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return e == cudaSuccess ? n : -(int)e;
}

extern "C" const char *pe_cuda_error_string(int status) {
    if (status == PE_CUDA_ERR_ARG) return "inconsistent arguments";
    return cudaGetErrorString((cudaError_t)status);
}
