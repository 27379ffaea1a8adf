/* The dense fp16 baseline (reference.dense_f16): the GEMV every effort timing is judged against. */
#include <metal_stdlib>

#include "pe_metal.h"
using namespace metal;

/* x (n_tok, n_in) @ W (n_in, n_out) fp16 over one split of the inputs -> partial (n_tok,
 * n_splits, n_out). Grid (n_tiles, n_splits, n_tok) of PE_MM_THREADS threads; a threadgroup
 * owns 128 columns (lane l: columns l + 32 q, q < 4: coalesced rows of W), its simdgroup s the
 * inputs s, s + 4, ... of the split; the simdgroups' sums are added in order. */
template <typename X>
kernel void kernel_dense_f16(device const X *x [[buffer(0)]],
                             device const half *w [[buffer(1)]],
                             constant pe_metal_params &p [[buffer(2)]],
                             device float *partial [[buffer(3)]],
                             uint3 tg [[threadgroup_position_in_grid]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float sums[PE_MM_SIMDGROUPS * PE_DENSE_COLS];
    const uint tok = tg.z, split = tg.y, c0 = tg.x * PE_DENSE_COLS;
    const uint per = (p.n_in + p.n_splits - 1) / p.n_splits;
    const uint lo = min(p.n_in, split * per), hi = min(p.n_in, lo + per);
    device const X *xt = x + tok * p.n_in;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint i = lo + sg; i < hi; i += PE_MM_SIMDGROUPS) {
        const float xi = float(xt[i]);
        for (uint q = 0; q < 4; q++) {
            const uint c = c0 + lane + 32 * q;
            if (c < p.n_out) a[q] += xi * float(w[i * p.n_out + c]);
        }
    }
    for (uint q = 0; q < 4; q++) sums[sg * PE_DENSE_COLS + lane + 32 * q] = a[q];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint c = c0 + tid;
    if (tid < PE_DENSE_COLS && c < p.n_out) {
        float y = 0.0f;
        for (uint s = 0; s < PE_MM_SIMDGROUPS; s++) y += sums[s * PE_DENSE_COLS + tid];
        partial[(tok * p.n_splits + split) * p.n_out + c] = y;
    }
}

#define PE_INSTANTIATE_DENSE(name, X)                                                          \
    template [[host_name(name)]] kernel void kernel_dense_f16<X>(                               \
        device const X *x [[buffer(0)]], device const half *w [[buffer(1)]],                    \
        constant pe_metal_params &p [[buffer(2)]], device float *partial [[buffer(3)]],         \
        uint3 tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],     \
        uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]);

PE_INSTANTIATE_DENSE("kernel_dense_f16_f32", float)
PE_INSTANTIATE_DENSE("kernel_dense_f16_f16", half)
