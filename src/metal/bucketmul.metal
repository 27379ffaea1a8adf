/* The effort matmul on the canonical bucket rows (reference.bucketmul), fp16 and q8 values. */
#include <metal_stdlib>

#include "pe_metal.h"
using namespace metal;

#define PE_ACC (PE_GROUP * PE_TILE_GROUPS) /* accumulators of one simdgroup: a tile's outputs */

/* fp16 rows (n_rows, G): the weight of row r, group g. */
struct pe_rows_f16 {
    device const half *values;
    uint n_groups;
    float at(uint r, uint g) const { return float(values[r * n_groups + g]); }
};

/* q8 rows (n_rows, G) int8 with scales (4 n_in, ceil(G / 4)) fp16, srow (n_rows,) the row of
 * scales of each bucket row: q * scale, exact in float32 (reference.dequantise). */
struct pe_rows_q8 {
    device const char *values;
    device const half *scales;
    device const uint *srow;
    uint n_groups, n_chunks;
    float at(uint r, uint g) const {
        return float(values[r * n_groups + g]) * float(scales[srow[r] * n_chunks + g / 4]);
    }
};

/* One column tile (64 groups: 1024 outputs) of one split of one token's dispatched rows ->
 * partial (n_tok, n_splits, n_out). Split y takes a contiguous share of the rows kernel_select
 * listed; simdgroup s walks entries s, s + 4, ... of it, lane l the groups l and l + 32 (coalesced
 * reads), adding x_i * w into its simdgroup's own slab of threadgroup memory at the weight's
 * position: no atomics, the same bits on every run. Slabs are added in order at the end. */
template <typename X, typename R, typename Acc>
inline void pe_bucketmul_tile(device const X *x, R rd, device const uchar *positions,
                              device const int *order, constant pe_metal_params &p,
                              device const uint *rows, device const uint *info,
                              device float *partial, Acc acc, uint3 tg, uint tid, uint lane,
                              uint sg) {
    const uint tok = tg.z, split = tg.y, g0 = tg.x * PE_TILE_GROUPS;
    for (uint i = tid; i < PE_MM_SIMDGROUPS * PE_ACC; i += PE_MM_THREADS) acc[i] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint n = info[tok * PE_INFO_WORDS + 1];
    const uint per = (n + p.n_splits - 1) / p.n_splits;
    const uint lo = min(n, split * per), hi = min(n, lo + per);
    device const uint *rt = rows + tok * p.n_rows;
    device const X *xt = x + tok * p.n_in;
    Acc mine = acc + sg * PE_ACC;
    for (uint j = lo + sg; j < hi; j += PE_MM_SIMDGROUPS) {
        const uint r = rt[j];
        const float xi = float(xt[order[r]]);
        for (uint q = 0; q < 2; q++) {
            const uint gl = lane + 32 * q, g = g0 + gl;
            if (g < p.n_groups) {
                const uint pos = (positions[r * p.pos_bytes + g / 2] >> (4 * (g & 1))) & 15u;
                mine[pos * PE_TILE_GROUPS + gl] += xi * rd.at(r, g);
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    device float *out = partial + (tok * p.n_splits + split) * p.n_out + g0 * PE_GROUP;
    for (uint o = tid; o < PE_ACC && g0 * PE_GROUP + o < p.n_out; o += PE_MM_THREADS) {
        const uint a = (o % PE_GROUP) * PE_TILE_GROUPS + o / PE_GROUP;
        float y = 0.0f;
        for (uint s = 0; s < PE_MM_SIMDGROUPS; s++) y += acc[s * PE_ACC + a];
        out[o] = y;
    }
}

/* x (n_tok, n_in) @ fp16 bucket rows -> partial (n_tok, n_splits, n_out): grid (n_tiles,
 * n_splits, n_tok) of PE_MM_THREADS threads, after kernel_select (rows, info). */
template <typename X>
kernel void kernel_bucketmul_f16(device const X *x [[buffer(0)]],
                                 device const half *values [[buffer(1)]],
                                 device const uchar *positions [[buffer(2)]],
                                 device const int *order [[buffer(3)]],
                                 constant pe_metal_params &p [[buffer(4)]],
                                 device const uint *rows [[buffer(5)]],
                                 device const uint *info [[buffer(6)]],
                                 device float *partial [[buffer(7)]],
                                 uint3 tg [[threadgroup_position_in_grid]],
                                 uint tid [[thread_index_in_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float acc[PE_MM_SIMDGROUPS * PE_ACC]; /* 16 KiB */
    const pe_rows_f16 rd = {values, p.n_groups};
    pe_bucketmul_tile(x, rd, positions, order, p, rows, info, partial, acc, tg, tid, lane, sg);
}

/* The same on q8 rows: values int8, scales and srow as pe_rows_q8. */
template <typename X>
kernel void kernel_bucketmul_q8(device const X *x [[buffer(0)]],
                                device const char *values [[buffer(1)]],
                                device const uchar *positions [[buffer(2)]],
                                device const int *order [[buffer(3)]],
                                constant pe_metal_params &p [[buffer(4)]],
                                device const uint *rows [[buffer(5)]],
                                device const uint *info [[buffer(6)]],
                                device float *partial [[buffer(7)]],
                                device const half *scales [[buffer(8)]],
                                device const uint *srow [[buffer(9)]],
                                uint3 tg [[threadgroup_position_in_grid]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint lane [[thread_index_in_simdgroup]],
                                uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float acc[PE_MM_SIMDGROUPS * PE_ACC]; /* 16 KiB */
    const pe_rows_q8 rd = {values, scales, srow, p.n_groups, p.n_chunks};
    pe_bucketmul_tile(x, rd, positions, order, p, rows, info, partial, acc, tg, tid, lane, sg);
}

#define PE_BUCKETMUL_ARGS(X, V)                                                                 \
    device const X *x [[buffer(0)]], device const V *values [[buffer(1)]],                      \
        device const uchar *positions [[buffer(2)]], device const int *order [[buffer(3)]],     \
        constant pe_metal_params &p [[buffer(4)]], device const uint *rows [[buffer(5)]],       \
        device const uint *info [[buffer(6)]], device float *partial [[buffer(7)]]
#define PE_TILE_IDS                                                                             \
    uint3 tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],        \
        uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]

template [[host_name("kernel_bucketmul_f16_f32")]] kernel void
kernel_bucketmul_f16<float>(PE_BUCKETMUL_ARGS(float, half), PE_TILE_IDS);
template [[host_name("kernel_bucketmul_f16_f16")]] kernel void
kernel_bucketmul_f16<half>(PE_BUCKETMUL_ARGS(half, half), PE_TILE_IDS);
template [[host_name("kernel_bucketmul_q8_f32")]] kernel void
kernel_bucketmul_q8<float>(PE_BUCKETMUL_ARGS(float, char), device const half *scales [[buffer(8)]],
                           device const uint *srow [[buffer(9)]], PE_TILE_IDS);
template [[host_name("kernel_bucketmul_q8_f16")]] kernel void
kernel_bucketmul_q8<half>(PE_BUCKETMUL_ARGS(half, char), device const half *scales [[buffer(8)]],
                          device const uint *srow [[buffer(9)]], PE_TILE_IDS);
