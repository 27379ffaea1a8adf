/* The last step of the effort and dense matmuls: their splits' partial outputs added in order. */
#include <metal_stdlib>

#include "pe_metal.h"
using namespace metal;

/* partial (n_tok, n_splits, n_out) -> y (n_tok, n_out) as Y: one thread per output, the splits
 * added in split order (the same bits on every run). Threadgroups of PE_REDUCE_THREADS. */
template <typename Y>
kernel void kernel_reduce(device const float *partial [[buffer(0)]],
                          device Y *y [[buffer(1)]],
                          constant pe_metal_params &p [[buffer(2)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= p.n_tok * p.n_out) return;
    const uint tok = i / p.n_out, o = i % p.n_out;
    device const float *src = partial + tok * p.n_splits * p.n_out + o;
    float s = 0.0f;
    for (uint k = 0; k < p.n_splits; k++) s += src[k * p.n_out];
    y[i] = Y(s);
}

template [[host_name("kernel_reduce_f32")]] kernel void kernel_reduce<float>(
    device const float *partial [[buffer(0)]], device float *y [[buffer(1)]],
    constant pe_metal_params &p [[buffer(2)]], uint i [[thread_position_in_grid]]);
template [[host_name("kernel_reduce_f16")]] kernel void kernel_reduce<half>(
    device const float *partial [[buffer(0)]], device half *y [[buffer(1)]],
    constant pe_metal_params &p [[buffer(2)]], uint i [[thread_position_in_grid]]);
