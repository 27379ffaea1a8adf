/* The cutoff selection of the effort matmul (reference.cutoff), on the device. */
#include <metal_stdlib>

#include "pe_metal.h"
using namespace metal;

#define PE_BINS 256      /* radix of the search: 8 key bits per pass, 4 passes */
#define PE_SELECT_ROWS 8 /* consecutive rows per thread */

/* Row r's weight: the real multiplications it carries (reference.row_mults). */
inline uint pe_row_mults(constant pe_metal_params &p, uint r) {
    return p.n_groups - (r >= p.short_from ? 1u : 0u);
}

/* Row r's key for one token: the bits of s = |x[order[r]]| * stats[r], a float32 product as
 * the reference's; s >= 0, so the bits order as the values. */
template <typename X>
inline uint pe_row_key(device const X *x, device const float *stats, device const int *order,
                       uint r) {
    return as_type<uint>(abs(float(x[order[r]])) * stats[r]);
}

/* x (n_tok, n_in) and the loaded rows' stats, order (n_rows,) -> per token the rows with
 * s >= cutoff, in row order (rows (n_tok, n_rows), the first info[1] valid), keys (n_tok,
 * n_rows) the rows' keys, and info (n_tok, 4): cutoff bits, rows, multiplications.
 * One threadgroup per token, 32..1024 threads (a multiple of 32); thread t keys the rows
 * 8 t .. 8 t + 7 of every block of 8 nt and is the only one to read their keys. The cutoff is the weighted
 * radix select of the largest key c with weight(keys >= c) >= need: 4 passes of 8 bits, a
 * histogram of the rows' weights in threadgroup atomics (integer sums: any order, one result),
 * the crossing bin found by simdgroup 0 with one prefix sum. */
template <typename X>
kernel void kernel_select(device const X *x [[buffer(0)]],
                          device const float *stats [[buffer(1)]],
                          device const int *order [[buffer(2)]],
                          constant pe_metal_params &p [[buffer(3)]],
                          device uint *keys [[buffer(4)]],
                          device uint *rows [[buffer(5)]],
                          device uint *info [[buffer(6)]],
                          uint tok [[threadgroup_position_in_grid]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint nt [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup atomic_uint hist[PE_BINS];
    threadgroup uint s_prefix, s_need, s_short, s_count[PE_SELECT_MAX_THREADS / 32];
    device const X *xt = x + tok * p.n_in;
    device uint *kt = keys + tok * p.n_rows;
    device uint *rt = rows + tok * p.n_rows;
    uint cut = 0x7F800000u; /* +inf: effort 0 dispatches nothing */
    if (p.need > 0) {
        if (tid == 0) s_prefix = 0, s_need = p.need, s_short = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (uint b = tid; b < PE_BINS; b += nt)
                atomic_store_explicit(&hist[b], 0u, memory_order_relaxed);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            const uint prefix = s_prefix, need = s_need;
            const uint mask = shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8);
            for (uint r0 = tid * PE_SELECT_ROWS; r0 < p.n_rows; r0 += nt * PE_SELECT_ROWS) {
                for (uint r = r0; r < min(r0 + PE_SELECT_ROWS, p.n_rows); r++) {
                    uint key;
                    if (shift == 24)
                        kt[r] = key = pe_row_key(xt, stats, order, r);
                    else
                        key = kt[r]; /* this thread's own write of the first pass */
                    if ((key & mask) == prefix)
                        atomic_fetch_add_explicit(&hist[(key >> shift) & (PE_BINS - 1)],
                                                  pe_row_mults(p, r), memory_order_relaxed);
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (sg == 0) { /* lane l: bins 255 - 8 l down to 248 - 8 l */
                uint w[8], tw = 0;
                for (uint q = 0; q < 8; q++)
                    tw += w[q] = atomic_load_explicit(&hist[PE_BINS - 1 - 8 * lane - q],
                                                      memory_order_relaxed);
                uint above = simd_prefix_inclusive_sum(tw) - tw;
                const uint total = simd_sum(tw);
                if (lane == 0 && total < need) s_short = 1; /* only in the first pass */
                if (above < need && above + tw >= need) {
                    for (uint q = 0; q < 8; q++) {
                        if (above + w[q] >= need) {
                            s_prefix = prefix | ((PE_BINS - 1 - 8 * lane - q) << shift);
                            s_need = need - above;
                            break;
                        }
                        above += w[q];
                    }
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (s_short) break; /* the loaded rows cannot reach the budget: all of them */
        }
        cut = s_short ? 0u : s_prefix;
    }
    /* compaction, in row order: per block of nt * 8 rows, thread t takes its 8 rows (those it
     * keyed), a simdgroup prefix sum of the counts places them */
    uint base = 0, mults = 0;
    const uint n_sg = nt / 32;
    for (uint b0 = 0; p.need > 0 && b0 < p.n_rows; b0 += nt * PE_SELECT_ROWS) {
        const uint first = b0 + tid * PE_SELECT_ROWS;
        uint take = 0; /* bit q: row first + q is dispatched */
        for (uint q = 0; q < PE_SELECT_ROWS && first + q < p.n_rows; q++)
            take |= kt[first + q] >= cut ? 1u << q : 0u;
        const uint count = popcount(take);
        const uint upto = simd_prefix_inclusive_sum(count);
        if (lane == 31) s_count[sg] = upto;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        uint off = base + upto - count, total = 0;
        for (uint k = 0; k < n_sg; k++) {
            off += k < sg ? s_count[k] : 0u;
            total += s_count[k];
        }
        for (uint q = 0; q < PE_SELECT_ROWS; q++) {
            if (take & (1u << q)) {
                rt[off++] = first + q;
                mults += pe_row_mults(p, first + q);
            }
        }
        base += total;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    mults = simd_sum(mults);
    if (lane == 0) s_count[sg] = mults;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        uint m = 0;
        for (uint k = 0; k < n_sg; k++) m += s_count[k];
        device uint *it = info + tok * PE_INFO_WORDS;
        it[0] = cut, it[1] = base, it[2] = m, it[3] = 0;
    }
}

#define PE_INSTANTIATE_SELECT(name, X)                                                         \
    template [[host_name(name)]] kernel void kernel_select<X>(                                  \
        device const X *x [[buffer(0)]], device const float *stats [[buffer(1)]],               \
        device const int *order [[buffer(2)]], constant pe_metal_params &p [[buffer(3)]],       \
        device uint *keys [[buffer(4)]], device uint *rows [[buffer(5)]],                       \
        device uint *info [[buffer(6)]], uint tok [[threadgroup_position_in_grid]],             \
        uint tid [[thread_position_in_threadgroup]], uint nt [[threads_per_threadgroup]],       \
        uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]]);

PE_INSTANTIATE_SELECT("kernel_select_f32", float)
PE_INSTANTIATE_SELECT("kernel_select_f16", half)
