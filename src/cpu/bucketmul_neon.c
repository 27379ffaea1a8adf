/* NEON (arm64) kernels. Packed bucket rows: 16 values are converted (fp16 -> fp32, baseline
 * ARMv8) and scaled in four vectors, then added into the tile's 256 accumulators (L1) at their
 * positions, one by one. */
#include <arm_neon.h>
#include <string.h>

#include "kernels.h"

void pe_dense_f16_neon(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                       const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);
void pe_permmul_f16_neon(const pe_packed *p, const pe_item *items,
                         const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                         int64_t c0, int64_t c1, float *y);

/* 16 fp16 at v times x -> out[16] f32. */
static inline void scale16(const uint16_t *v, float32x4_t xv, float out[16]) {
    float16x8_t a = vreinterpretq_f16_u16(vld1q_u16(v));
    float16x8_t b = vreinterpretq_f16_u16(vld1q_u16(v + 8));
    vst1q_f32(out, vmulq_f32(vcvt_f32_f16(vget_low_f16(a)), xv));
    vst1q_f32(out + 4, vmulq_f32(vcvt_high_f32_f16(a), xv));
    vst1q_f32(out + 8, vmulq_f32(vcvt_f32_f16(vget_low_f16(b)), xv));
    vst1q_f32(out + 12, vmulq_f32(vcvt_high_f32_f16(b), xv));
}

/* acc[16 l + pos_l] += xw[l] for the 16 nibbles of pos; the shifts are independent. */
#define SC(L) acc[16 * (L) + ((pos >> (4 * (L))) & 15)] += xw[L]
#define SCATTER16(acc, pos, xw)                                                          \
    do {                                                                                 \
        SC(0); SC(1); SC(2); SC(3); SC(4); SC(5); SC(6); SC(7);                          \
        SC(8); SC(9); SC(10); SC(11); SC(12); SC(13); SC(14); SC(15);                    \
    } while (0)

/* One batch of n staged slots (strides vs, qs) on tile t: acc[16 l + pos] += x * w. */
static void batch_tile(const uint16_t *vals, const uint8_t *pos, const float *xs, int64_t n,
                       int64_t vs, int64_t qs, int64_t t, float *acc) {
    float xw[16] __attribute__((aligned(16)));
    const uint16_t *v = vals + t * PE_TILE;
    const uint8_t *q = pos + t * (PE_TILE / 2);
    for (int64_t s = 0; s < n; s++, v += vs, q += qs) {
        scale16(v, vdupq_n_f32(xs[s]), xw);
        uint64_t pos;
        memcpy(&pos, q, 8);
        SCATTER16(acc, pos, xw);
    }
}

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)): batches of runs, staged, tile by tile. */
static void packedmul_f16_neon(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
                               int64_t n_runs, int64_t t0, int64_t t1, float *y) {
    static _Thread_local float acc[PE_CHUNK][256] __attribute__((aligned(64)));
    static _Thread_local uint16_t vals[PE_BATCH * PE_CHUNK * PE_TILE] __attribute__((aligned(64)));
    static _Thread_local uint8_t pos[PE_BATCH * PE_CHUNK * 8] __attribute__((aligned(64)));
    static _Thread_local float xs[PE_BATCH];
    for (int64_t c0 = t0; c0 < t1; c0 += PE_CHUNK) {
        int64_t c1 = c0 + PE_CHUNK < t1 ? c0 + PE_CHUNK : t1, nt = c1 - c0;
        memset(acc, 0, sizeof(float) * 256 * (size_t)nt);
        for (int64_t r0 = 0, r1; r0 < n_runs; r0 = r1) {
            r1 = pe_batch_end(runs, n_runs, r0);
            if (r1 < n_runs)
                pe_prefetch_batch(pk, b, runs, r1, pe_batch_end(runs, n_runs, r1), c0, c1);
            int64_t n = pe_stage(pk, b, runs, r0, r1, c0, c1, vals, pos, xs);
            for (int64_t t = 0; t < nt; t++)
                batch_tile(vals, pos, xs, n, nt * PE_TILE, nt * 8, t, acc[t]);
        }
        for (int64_t t = c0; t < c1; t++) {
            int64_t j0 = 256 * t, n = pk->n_out - j0 < 256 ? pk->n_out - j0 : 256;
            memcpy(y + j0, acc[t - c0], sizeof(float) * (size_t)n);
        }
    }
}

/* The permuted kernel (permmul_neon.c) where pack.c built the copy; the routed one for
 * matrices without it (repeated positions, values that are not finite). */
const pe_cpu_kernels pe_kernels_neon = {"neon", NULL, packedmul_f16_neon, pe_dense_f16_neon, NULL,
                                        pe_permmul_f16_neon, NULL};
