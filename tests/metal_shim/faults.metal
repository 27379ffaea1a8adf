/* Kernels with the faults the shim must catch (tests/test_metal_shim.py): each is a bug a real
 * kernel could have. Not part of the product. */
#include <metal_stdlib>
using namespace metal;

/* out[i] = a[i + 1]: the last thread reads one element past the end of a. */
kernel void kernel_fault_read_past(device const float *a [[buffer(0)]],
                                   device float *out [[buffer(1)]],
                                   constant uint &n [[buffer(2)]],
                                   uint i [[thread_position_in_grid]]) {
    if (i < n) out[i] = a[i + 1];
}

/* out[i + 1] = a[i]: the last thread writes one element past the end of out. */
kernel void kernel_fault_write_past(device const float *a [[buffer(0)]],
                                    device float *out [[buffer(1)]],
                                    constant uint &n [[buffer(2)]],
                                    uint i [[thread_position_in_grid]]) {
    if (i < n) out[i + 1] = a[i];
}

/* A threadgroup array indexed one past its end by the last thread. */
kernel void kernel_fault_threadgroup_past(device float *out [[buffer(0)]],
                                          uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float t[PE_MM_THREADS];
    t[tid + 1] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = t[tid];
}

/* A barrier inside a branch that half of every simdgroup skips. */
kernel void kernel_fault_divergent_barrier(device float *out [[buffer(0)]],
                                           uint tid [[thread_index_in_threadgroup]],
                                           uint lane [[thread_index_in_simdgroup]]) {
    if (lane < 16) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 1.0f;
}

/* A simdgroup sum that half of the lanes skip. */
kernel void kernel_fault_divergent_simd(device float *out [[buffer(0)]],
                                        uint tid [[thread_index_in_threadgroup]],
                                        uint lane [[thread_index_in_simdgroup]]) {
    float v = 1.0f;
    if (lane < 16) v = simd_sum(v);
    out[tid] = v;
}
