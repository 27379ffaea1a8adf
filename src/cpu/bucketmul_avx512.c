/* AVX-512 (F, BW, VL, DQ + F16C, FMA) effort matmul. Tiles of 16 groups go in pairs: the even
 * tile keeps 16 accumulators A[p] in registers (lane l = output 16 (16 t + l) + p) and routes
 * each row's 16 values by comparing their positions with p (byte compares -> masks) and a masked
 * FMA or add per p; the odd tile adds each value into L1 at its position with scalar adds. The
 * two use different ports, so together they run faster than either (bench/README.md). */
#include <immintrin.h>
#include <string.h>

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

/* tile[p][l] (16 x 16) -> y[256 t + 16 l + p] for outputs below n_out. */
static void store_tile(const float *tile, int64_t t, int64_t n_out, float *y) {
    const __m512i col = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
                                         64, 48, 32, 16, 0);
    for (int l = 0; l < 16; l++) {
        int64_t j = 256 * t + 16 * l;
        if (j >= n_out) break;
        __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(l)), tile, 4);
        __mmask16 keep = n_out - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n_out - j)) - 1);
        _mm512_mask_storeu_ps(y + j, keep, v);
    }
}

/* One batch of n slots staged contiguously (vs, qs: slot strides) on tile t: A[p] (acc[p][l])
 * += routed x * w, slots in run order. */
static void batch_tile(const uint16_t *vals, const uint8_t *pos, const float *xs, int64_t n,
                       int64_t vs, int64_t qs, int64_t t, float *acc) {
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    __m512 a[16];
    for (int p = 0; p < 16; p++) a[p] = _mm512_load_ps(acc + 16 * p);
    const uint16_t *v = vals + t * PE_TILE;
    const uint8_t *q = pos + t * (PE_TILE / 2);
    for (int64_t s = 0; s < n; s++, v += vs, q += qs) {
        __m512 xv = _mm512_set1_ps(xs[s]);
        __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)v));
        __m512 xw = _mm512_mul_ps(w, xv);
        __m128i b = _mm_loadl_epi64((const __m128i *)q);
        __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(b, lo4),
                                        _mm_and_si128(_mm_srli_epi16(b, 4), lo4));
        ROUTE(0); ROUTE(1); ROUTE(2); ROUTE(3); ROUTE(4); ROUTE(5); ROUTE(6); ROUTE(7);
        ROUTE(8); ROUTE(9); ROUTE(10); ROUTE(11); ROUTE(12); ROUTE(13); ROUTE(14); ROUTE(15);
    }
    for (int p = 0; p < 16; p++) _mm512_store_ps(acc + 16 * p, a[p]);
}

/* acc[16 l + pos_l] += xw[l] for the 16 nibbles of pos (scalar routing through L1). */
#define SC(L) sacc[16 * (L) + ((qs_ >> (4 * (L))) & 15)] += xw[L]

/* Tiles t (masked routing in registers, acc[p][l]) and t + 1 (scalar routing, sacc[l][p]) of
 * one staged batch together: the two use different execution ports, so they overlap. */
static void batch_tile_pair(const uint16_t *vals, const uint8_t *pos, const float *xs,
                            int64_t n, int64_t vs, int64_t qs, int64_t t, float *acc,
                            float *sacc) {
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    float xw[16] __attribute__((aligned(64)));
    __m512 a[16];
    for (int p = 0; p < 16; p++) a[p] = _mm512_load_ps(acc + 16 * p);
    const uint16_t *v = vals + t * PE_TILE;
    const uint8_t *q = pos + t * (PE_TILE / 2);
    for (int64_t s = 0; s < n; s++, v += vs, q += qs) {
        __m512 xv = _mm512_set1_ps(xs[s]);
        _mm512_store_ps(xw, _mm512_mul_ps(
            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + PE_TILE))), xv));
        uint64_t qs_;
        memcpy(&qs_, q + PE_TILE / 2, 8);
        __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)v));
        __m512 xw2 = _mm512_mul_ps(w, xv);
        __m128i b = _mm_loadl_epi64((const __m128i *)q);
        __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(b, lo4),
                                        _mm_and_si128(_mm_srli_epi16(b, 4), lo4));
#define xw xw2
        ROUTE(0); ROUTE(1); ROUTE(2); ROUTE(3); ROUTE(4); ROUTE(5); ROUTE(6); ROUTE(7);
#undef xw
        SC(0); SC(1); SC(2); SC(3); SC(4); SC(5); SC(6); SC(7);
#define xw xw2
        ROUTE(8); ROUTE(9); ROUTE(10); ROUTE(11); ROUTE(12); ROUTE(13); ROUTE(14); ROUTE(15);
#undef xw
        SC(8); SC(9); SC(10); SC(11); SC(12); SC(13); SC(14); SC(15);
    }
    for (int p = 0; p < 16; p++) _mm512_store_ps(acc + 16 * p, a[p]);
}

/* runs (slots of P) -> y[256 t0, min(256 t1, n_out)): batches of runs, staged, tile by tile
 * (pairs of tiles: the first routed in registers, the second through L1). */
void pe_packedmul_f16_avx512(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
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
            int64_t n = pe_stage(pk, b, runs, r0, r1, c0, c1, vals, pos, xs), t = 0;
            for (; t + 2 <= nt; t += 2)
                batch_tile_pair(vals, pos, xs, n, nt * PE_TILE, nt * 8, t, acc[t], acc[t + 1]);
            if (t < nt) batch_tile(vals, pos, xs, n, nt * PE_TILE, nt * 8, t, acc[t]);
        }
        for (int64_t t = 0; t < nt; t++) {
            int64_t j0 = 256 * (c0 + t), m = pk->n_out - j0 < 256 ? pk->n_out - j0 : 256;
            if (t & 1) /* scalar-routed tiles are already in output order */
                memcpy(y + j0, acc[t], sizeof(float) * (size_t)m);
            else
                store_tile(acc[t], c0 + t, pk->n_out, y);
        }
    }
}

const pe_cpu_kernels pe_kernels_avx512 = {"avx512", NULL, pe_packedmul_f16_avx512,
                                          pe_dense_f16_avx512, NULL, NULL,
                                          pe_select_items_avx2};
