/* AVX-512 (F, BW, VL, DQ + F16C, FMA) kernels. Packed bucket rows: a tile of 16 groups keeps
 * 16 accumulators A[p], lane l = output 16 (16 t + l) + p; each row of 16 values is routed by
 * comparing its positions with p (16 byte compares -> masks) and a masked FMA or add per p. */
#include <immintrin.h>

#include "kernels.h"

void pe_dense_f16_avx512(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                         const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);

/* A[p] += (pos == p) ? x * w : 0; even p by masked FMA, odd p by masked add of x * w, so both
 * the FMA and the add pipes work. */
#define ROUTE(P)                                                                 \
    do {                                                                         \
        __mmask16 k = _mm_cmpeq_epi8_mask(idx, _mm_set1_epi8(P));                \
        if ((P) & 1)                                                             \
            a[P] = _mm512_mask_add_ps(a[P], k, a[P], xw);                        \
        else                                                                     \
            a[P] = _mm512_mask3_fmadd_ps(w, xv, a[P], k);                        \
    } while (0)

/* A[p] lane l (16 x 16) -> y[256 t + 16 l + p] for outputs below n_out. */
static void store_tile(const __m512 a[16], int64_t t, int64_t n_out, float *y) {
    float tile[16][16] __attribute__((aligned(64))); /* [p][l] */
    for (int p = 0; p < 16; p++) _mm512_store_ps(tile[p], a[p]);
    __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                      3, 2, 1, 0), _mm512_set1_epi32(16));
    for (int l = 0; l < 16; l++) {
        int64_t j = 256 * t + 16 * l;
        if (j >= n_out) break;
        __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(l)),
                                       &tile[0][0], 4); /* tile[p][l], p = 0..15 */
        __mmask16 keep = n_out - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n_out - j)) - 1);
        _mm512_mask_storeu_ps(y + j, keep, v);
    }
}

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)), tile by tile; sums in run order. */
static void packedmul_f16_avx512(const pe_packed *pk, const pe_run *runs, int64_t n_runs,
                                 int64_t t0, int64_t t1, float *y) {
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    for (int64_t t = t0; t < t1; t++) {
        __m512 a[16];
        for (int p = 0; p < 16; p++) a[p] = _mm512_setzero_ps();
        const uint16_t *vt = pk->values + t * pk->n_slots * PE_TILE;
        const uint8_t *qt = pk->pos + t * pk->n_slots * (PE_TILE / 2);
        for (int64_t r = 0; r < n_runs; r++) {
            __m512 xv = _mm512_set1_ps(runs[r].x);
            const uint16_t *v = vt + (int64_t)runs[r].slot * PE_TILE;
            const uint8_t *q = qt + (int64_t)runs[r].slot * (PE_TILE / 2);
            for (int s = 0; s < runs[r].n; s++, v += PE_TILE, q += PE_TILE / 2) {
                __m512 w = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)v));
                __m512 xw = _mm512_mul_ps(w, xv);
                __m128i b = _mm_loadl_epi64((const __m128i *)q);
                __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(b, lo4),
                                                _mm_and_si128(_mm_srli_epi16(b, 4), lo4));
                ROUTE(0); ROUTE(1); ROUTE(2); ROUTE(3); ROUTE(4); ROUTE(5); ROUTE(6); ROUTE(7);
                ROUTE(8); ROUTE(9); ROUTE(10); ROUTE(11); ROUTE(12); ROUTE(13); ROUTE(14);
                ROUTE(15);
            }
        }
        store_tile(a, t, pk->n_out, y);
    }
}

const pe_cpu_kernels pe_kernels_avx512 = {"avx512", NULL, packedmul_f16_avx512,
                                          pe_dense_f16_avx512};
