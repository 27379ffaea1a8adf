/* NEON (arm64) kernels. Packed bucket rows: 16 values are converted (fp16 -> fp32, baseline
 * ARMv8) and scaled in four vectors, then added into the tile's 256 accumulators (L1) at their
 * positions, one by one. */
#include <arm_neon.h>
#include <string.h>

#include "kernels.h"

void pe_dense_f16_neon(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                       const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);

/* 16 fp16 at v times x -> out[16] f32. */
static inline void scale16(const uint16_t *v, float32x4_t xv, float out[16]) {
    float16x8_t a = vreinterpretq_f16_u16(vld1q_u16(v));
    float16x8_t b = vreinterpretq_f16_u16(vld1q_u16(v + 8));
    vst1q_f32(out, vmulq_f32(vcvt_f32_f16(vget_low_f16(a)), xv));
    vst1q_f32(out + 4, vmulq_f32(vcvt_high_f32_f16(a), xv));
    vst1q_f32(out + 8, vmulq_f32(vcvt_f32_f16(vget_low_f16(b)), xv));
    vst1q_f32(out + 12, vmulq_f32(vcvt_high_f32_f16(b), xv));
}

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)), tile by tile; sums in run order. */
static void packedmul_f16_neon(const pe_packed *pk, const pe_run *runs, int64_t n_runs,
                               int64_t t0, int64_t t1, float *y) {
    float acc[256] __attribute__((aligned(16))), xw[16] __attribute__((aligned(16)));
    for (int64_t t = t0; t < t1; t++) {
        memset(acc, 0, sizeof acc);
        const uint16_t *vt = pk->values + t * pk->n_slots * PE_TILE;
        const uint8_t *qt = pk->pos + t * pk->n_slots * (PE_TILE / 2);
        for (int64_t r = 0; r < n_runs; r++) {
            float32x4_t xv = vdupq_n_f32(runs[r].x);
            const uint16_t *v = vt + (int64_t)runs[r].slot * PE_TILE;
            const uint8_t *q = qt + (int64_t)runs[r].slot * (PE_TILE / 2);
            for (int s = 0; s < runs[r].n; s++, v += PE_TILE, q += PE_TILE / 2) {
                scale16(v, xv, xw);
                uint64_t pos;
                memcpy(&pos, q, 8);
                for (int l = 0; l < 16; l++, pos >>= 4) acc[16 * l + (pos & 15)] += xw[l];
            }
        }
        int64_t j0 = 256 * t, n = pk->n_out - j0 < 256 ? pk->n_out - j0 : 256;
        memcpy(y + j0, acc, sizeof(float) * (size_t)n);
    }
}

const pe_cpu_kernels pe_kernels_neon = {"neon", NULL, packedmul_f16_neon, pe_dense_f16_neon};
