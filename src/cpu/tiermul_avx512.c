/* AVX-512 VBMI2 effort matmul on the tiered copy (kernels.h, "The tiered layout"). Per input
 * and chunk of 4 groups, each dispatched tier is placed at its positions by two word expands
 * (vpexpandw), the tiers of one input merge into one vector per group (their positions are
 * disjoint), and one convert + FMA per group adds x * w into the accumulators: no per-weight
 * routing. A partly dispatched last tier keeps only its first K' ranks (its rank codes, turned
 * into a position mask with pext/pdep). */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

void pe_dense_f16_avx512(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                         const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1, float *y);
void pe_packedmul_f16_avx512(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
                             int64_t n_runs, int64_t t0, int64_t t1, float *y);

#define BLOCK 256 /* chunks per pass over the accumulators: 64 x 64 floats = 16 KiB (L1) */
#define MAX_BATCH 8
#define PE_INLINE __attribute__((always_inline)) /* T, PARTIAL constant: loops unroll */

/* Inputs per batch for T tiers: about 8 row streams at once (the prefetchers' reach). */
static const int batch_size[PE_RANKS / PE_TIER + 1] = {0, 8, 4, 3, 2};

/* Tiers of one record -> the merged group pair vectors v0 (groups 0, 1), v1 (groups 2, 3). */
static inline PE_INLINE void merge_tier(const uint8_t *rec, __m512i *v0, __m512i *v1) {
    uint64_t m;
    memcpy(&m, rec, 8);
    __m512i w0 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 8)));
    __m512i w1 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 24)));
    *v0 = _mm512_mask_expand_epi16(*v0, (__mmask32)m, w0);
    *v1 = _mm512_mask_expand_epi16(*v1, (__mmask32)(m >> 32), w1);
}

/* The positions (64 bits, 4 groups) of the slots whose rank code (2 bits, codes) is below kk,
 * given the slots' positions m: the 16 slot bits deposited at the set bits of m. */
static inline PE_INLINE uint64_t keep_mask(uint64_t m, uint32_t codes, int kk) {
    uint32_t hi = (codes >> 1) & 0x55555555u, lo = codes & 0x55555555u;
    uint32_t below = kk == 1 ? ~(hi | lo) : kk == 2 ? ~hi : ~(hi & lo); /* code < kk */
    return _pdep_u64(_pext_u32(below, 0x55555555u), m);
}

/* The same for a partly dispatched tier: only its slots of rank code below kk keep. */
static inline PE_INLINE void merge_prefix(const uint8_t *rec, uint32_t codes, int kk,
                                          __m512i *v0, __m512i *v1) {
    uint64_t m;
    memcpy(&m, rec, 8);
    uint64_t keep = keep_mask(m, codes, kk);
    __m512i w0 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 8)));
    __m512i w1 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rec + 24)));
    *v0 = _mm512_mask_mov_epi16(*v0, (__mmask32)keep, _mm512_maskz_expand_epi16((__mmask32)m, w0));
    *v1 = _mm512_mask_mov_epi16(*v1, (__mmask32)(keep >> 32),
                                _mm512_maskz_expand_epi16((__mmask32)(m >> 32), w1));
}

/* acc[64 c + j] += x_u * w for n inputs items[0, n), each with T tiers (the last one partial
 * when PARTIAL), over chunks [cb, cb + nc) of their tier rows. Inputs add in item order. */
static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc) {
    int64_t row = p->n_chunks * PE_TIER_CHUNK;
    const uint8_t *rec[MAX_BATCH];
    const uint32_t *codes[MAX_BATCH];
    int kk[MAX_BATCH];
    __m512 xv[MAX_BATCH];
    for (int u = 0; u < n; u++) {
        const uint8_t *r0 = p->tiers + p->tier_off[items[u].input];
        rec[u] = r0 + cb * PE_TIER_REC;
        codes[u] = (const uint32_t *)(r0 + (T - 1) * row + p->n_chunks * PE_TIER_REC) + cb;
        kk[u] = items[u].k % PE_TIER;
        xv[u] = _mm512_set1_ps(items[u].x);
    }
    for (int64_t c = 0; c < nc; c++) {
        float *a = acc + 64 * c;
        __m512 a0 = _mm512_load_ps(a), a1 = _mm512_load_ps(a + 16);
        __m512 a2 = _mm512_load_ps(a + 32), a3 = _mm512_load_ps(a + 48);
        for (int u = 0; u < n; u++) {
            __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
            const uint8_t *r = rec[u] + c * PE_TIER_REC;
            for (int t = 0; t < T - PARTIAL; t++) merge_tier(r + t * row, &v0, &v1);
            if (PARTIAL) merge_prefix(r + (T - 1) * row, codes[u][c], kk[u], &v0, &v1);
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v0)), xv[u], a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v0, 1)), xv[u], a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(v1)), xv[u], a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(v1, 1)), xv[u], a3);
        }
        _mm512_store_ps(a, a0);
        _mm512_store_ps(a + 16, a1);
        _mm512_store_ps(a + 32, a2);
        _mm512_store_ps(a + 48, a3);
    }
}

/* Prefetches into L2 the first PF_HEAD bytes of each tier row of the next batch: a batch
 * starts cold streams that the hardware prefetchers take a while to pick up. */
#define PF_HEAD 4096
static inline void prefetch_heads(const pe_packed *p, const pe_item *items, int64_t n, int T,
                                  int64_t cb, int64_t nc) {
    int64_t row = p->n_chunks * PE_TIER_CHUNK, len = nc * PE_TIER_REC;
    if (len > PF_HEAD) len = PF_HEAD;
    for (int64_t u = 0; u < n; u++) {
        const char *r0 = (const char *)(p->tiers + p->tier_off[items[u].input] + cb * PE_TIER_REC);
        for (int t = 0; t < T; t++)
            for (int64_t o = 0; o < len; o += 64) _mm_prefetch(r0 + t * row + o, _MM_HINT_T1);
    }
}

/* All items of class cl (T = cl / 2 + 1 tiers, partial = cl & 1) in batches. */
static void run_class(const pe_packed *p, const pe_item *items, int64_t n, int cl, int64_t cb,
                      int64_t nc, float *acc) {
    const int T = cl / 2 + 1, bs = batch_size[T];
    for (int64_t s = 0; s < n; s += bs) {
        int m = n - s < bs ? (int)(n - s) : bs;
        prefetch_heads(p, items + s + bs, n - s - bs < bs ? n - s - bs : bs, T, cb, nc);
        switch (cl) { /* constant T and PARTIAL: the tier loop unrolls */
        case 0: batch(p, items + s, m, 1, 0, cb, nc, acc); break;
        case 1: batch(p, items + s, m, 1, 1, cb, nc, acc); break;
        case 2: batch(p, items + s, m, 2, 0, cb, nc, acc); break;
        case 3: batch(p, items + s, m, 2, 1, cb, nc, acc); break;
        case 4: batch(p, items + s, m, 3, 0, cb, nc, acc); break;
        case 5: batch(p, items + s, m, 3, 1, cb, nc, acc); break;
        case 6: batch(p, items + s, m, 4, 0, cb, nc, acc); break;
        default: batch(p, items + s, m, 4, 1, cb, nc, acc); break;
        }
    }
}

static void tiermul_f16_avx512vbmi2(const pe_packed *p, const pe_item *items,
                                    const int64_t begin[PE_CLASSES],
                                    const int64_t end[PE_CLASSES], int64_t c0, int64_t c1,
                                    float *y) {
    static _Thread_local float acc[BLOCK * 64] __attribute__((aligned(64)));
    for (int64_t cb = c0; cb < c1; cb += BLOCK) {
        int64_t nc = c1 - cb < BLOCK ? c1 - cb : BLOCK;
        memset(acc, 0, sizeof(float) * 64 * (size_t)nc);
        for (int cl = 0; cl < PE_CLASSES; cl++)
            run_class(p, items + begin[cl], end[cl] - begin[cl], cl, cb, nc, acc);
        int64_t j0 = 64 * cb, m = p->n_out - j0 < 64 * nc ? p->n_out - j0 : 64 * nc;
        memcpy(y + j0, acc, sizeof(float) * (size_t)m);
    }
}

/* The routed avx512 kernel stays for matrices without a tiered copy (statistics that rise). */
const pe_cpu_kernels pe_kernels_avx512vbmi2 = {"avx512vbmi2", NULL, pe_packedmul_f16_avx512,
                                               pe_dense_f16_avx512, tiermul_f16_avx512vbmi2};
