/* Cutoff selection: which bucket rows one token dispatches (reference.cutoff), as items.
 * Exact. Compiled twice (setup.py): portable (SSE2 on x86-64, plain C elsewhere) as
 * pe_select_items and, with -mavx2 -DPE_SELECT_FN=pe_select_items_avx2, with AVX2 for the x86
 * kernel sets (8- and 16-lane compares): the same cutoffs, rows and items. */
#include <math.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels.h"

#ifndef PE_SELECT_FN /* the AVX2 build names its entry point */
#define PE_SELECT_FN pe_select_items
#endif

/* 1 if no x_i is a NaN or an infinity (exponent bits all ones): a loop that vectorises. */
static int all_finite(const float *x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        bad |= (u & 0x7F800000u) == 0x7F800000u;
    }
    return !bad;
}

/* An input's 16 keys are positive floats' bits, below 2^31, so signed compares order them.
 * x86-64 compares them with SSE2 (its baseline), other targets in plain C; candidate slots are
 * written 4 at a time in 4-lane vectors (GCC/Clang vector extensions). */
typedef int32_t lanes4 __attribute__((vector_size(16)));

/* Bit k set where k16[k] >= t (16 lanes; 1 <= t <= 32767). */
static inline uint32_t ge_mask16(const int16_t *k16, int32_t t) {
#if defined(__AVX2__)
    __m256i c = _mm256_cmpgt_epi16(_mm256_loadu_si256((const __m256i *)k16),
                                   _mm256_set1_epi16((int16_t)(t - 1)));
    __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    return (uint32_t)_mm_movemask_epi8(b);
#elif defined(__SSE2__)
    __m128i tv = _mm_set1_epi16((int16_t)(t - 1));
    __m128i a = _mm_cmpgt_epi16(_mm_loadu_si128((const __m128i *)k16), tv);
    __m128i b = _mm_cmpgt_epi16(_mm_loadu_si128((const __m128i *)(k16 + 8)), tv);
    return (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(a, b));
#else
    uint32_t m = 0;
    for (int k = 0; k < PE_RANKS; k++) m |= (uint32_t)(k16[k] >= t) << k;
    return m;
#endif
}

/* Bit k set where key[k] >= t (16 lanes; 1 <= t < 2^31: keys compare as signed). */
static inline uint32_t ge_mask32(const uint32_t *key, uint32_t t) {
#if defined(__AVX2__)
    __m256i tv = _mm256_set1_epi32((int32_t)(t - 1));
    __m256i c0 = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)key), tv),
            c1 = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(key + 8)), tv);
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(c0)) |
           (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(c1)) << 8;
#elif defined(__SSE2__)
    __m128i tv = _mm_set1_epi32((int32_t)(t - 1)), c[4];
    for (int q = 0; q < 4; q++)
        c[q] = _mm_cmpgt_epi32(_mm_loadu_si128((const __m128i *)(key + 4 * q)), tv);
    __m128i w = _mm_packs_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    return (uint32_t)_mm_movemask_epi8(w);
#else
    uint32_t m = 0;
    for (int k = 0; k < PE_RANKS; k++) m |= (uint32_t)(key[k] >= t) << k;
    return m;
#endif
}

/* The length of the prefix of ones of a 16-bit mask (a monotone input's keys >= t). */
static inline int prefix_len(uint32_t mask) { return __builtin_ctz(~mask); }

/* One radix digit: the highest bin where the weight at or above it first reaches budget.
 * hist (n_bins) weights of the candidates by digit; *above: weight strictly above, updated. */
static int pick_bin(const int64_t *hist, int n_bins, double budget, int64_t *above) {
    int64_t acc = *above;
    int bin = n_bins - 1;
    for (; bin > 0; bin--) {
        if ((double)(acc + hist[bin]) >= budget) break;
        acc += hist[bin];
    }
    *above = acc;
    return bin;
}

/* ---------------------------------------------------------------- histogram cutoff
 * The cutoff on keys in slot order (input-major, 16 lanes per input): it depends only on the
 * multiset of (key, m), so it is reference.cutoff's c, and the same rows are dispatched. */

#define HIST_BLOCK 256 /* inputs per block of keys and digits: 16 KiB of keys (L1) */

/* The keys of inputs [i0, i1) (key[16 i + k] = abs(x_i) stat_ik's bits), their first radix
 * digits (key >> 21) weighted by m added into hist, and the highest digit when p is monotone
 * (else 2047): one pass over the stats, the part of the search that grows with the matrix. */
static uint32_t keys_and_digits(const pe_packed *p, const float *x, int64_t i0, int64_t i1,
                                uint32_t *key, int64_t *hist) {
    /* rank by rank: neighbours are then different inputs, whose bins seldom repeat, so the
     * adds rarely wait on each other's stores and nothing branches on the data (an input's
     * own keys share bins in runs of unpredictable length); in blocks of inputs whose keys
     * stay in L1 (the strided walk over all of them missed it) */
    uint32_t top = p->monotone ? 0 : 2047; /* the highest bin holding a key: the scan for the
                                            * budget starts there (monotone: rank 0 holds an
                                            * input's largest key) */
    for (int64_t b0 = i0; b0 < i1; b0 += HIST_BLOCK) {
        int64_t b1 = i1 - b0 < HIST_BLOCK ? i1 : b0 + HIST_BLOCK;
        for (int64_t i = b0; i < b1; i++) { /* 16 products in a row: the compiler vectorises */
            float ax = fabsf(x[i]), s[PE_RANKS];
            const float *st = p->stats + i * PE_RANKS;
            for (int k = 0; k < PE_RANKS; k++) s[k] = ax * st[k];
            memcpy(key + i * PE_RANKS, s, sizeof s);
        }
        for (int k = 0; k < PE_RANKS; k++) {
            const int64_t mk = p->m[k];
#pragma GCC unroll 4
            for (int64_t r = b0 * PE_RANKS + k; r < b1 * PE_RANKS; r += PE_RANKS)
                hist[key[r] >> 21] += mk;
        }
        if (p->monotone)
            for (int64_t r = b0 * PE_RANKS; r < b1 * PE_RANKS; r += PE_RANKS)
                top = key[r] >> 21 > top ? key[r] >> 21 : top;
    }
    return top;
}

/* Inputs per part of the first pass when it is split over the threads (below: one part). */
#ifndef SPLIT_MIN_INPUTS
#define SPLIT_MIN_INPUTS 1024
#endif
#define MAX_PARTS 4

typedef struct {
    const pe_packed *p;
    const float *x;
    uint32_t *key;
    int64_t hist[MAX_PARTS][2048];
    uint32_t top[MAX_PARTS];
} digits_job;

static void digits_part(void *ctx, int t, int n) {
    digits_job *j = ctx;
    int64_t i0 = j->p->n_in * t / n, i1 = j->p->n_in * (t + 1) / n;
    memset(j->hist[t], 0, sizeof j->hist[t]);
    j->top[t] = keys_and_digits(j->p, j->x, i0, i1, j->key, j->hist[t]);
}

/* keys_and_digits over every input, split over the thread pool for large matrices (disjoint
 * input ranges; the histogram is a sum of integers, so the split never changes the cutoff). */
static uint32_t all_keys_and_digits(const pe_packed *p, const float *x, int n_threads,
                                    uint32_t *key, int64_t hist[2048]) {
    int n = n_threads < MAX_PARTS ? n_threads : MAX_PARTS;
    if (n < 2 || p->n_in < n * SPLIT_MIN_INPUTS) {
        memset(hist, 0, sizeof(int64_t) * 2048);
        return keys_and_digits(p, x, 0, p->n_in, key, hist);
    }
    digits_job job;
    job.p = p;
    job.x = x;
    job.key = key;
    if (pe_parallel(digits_part, &job, n, n) != PE_OK) { /* no worker: one part */
        memset(hist, 0, sizeof(int64_t) * 2048);
        return keys_and_digits(p, x, 0, p->n_in, key, hist);
    }
    uint32_t top = 0;
    for (int b = 0; b < 2048; b++) {
        int64_t h = 0;
        for (int t = 0; t < n; t++) h += job.hist[t][b];
        hist[b] = h;
    }
    for (int t = 0; t < n; t++) top = job.top[t] > top ? job.top[t] : top;
    return top;
}

/* key (16 n_in) with its first digits in hist (all_keys_and_digits, top the highest) -> the
 * largest c with weight(key >= c) >= budget; lanes past n_loaded weigh 0. */
static uint32_t radix_cutoff_packed(const pe_packed *p, const uint32_t *key, uint32_t *cand,
                                    int64_t hist[2048], uint32_t top, double budget) {
    /* digits: 11 bits over all keys, then 7 + 7 + 7 over the few candidates (small histograms
     * to clear and scan) */
    static const int shift[4] = {21, 14, 7, 0}, bits[4] = {11, 7, 7, 7};
    int64_t above = 0, n = p->n_in * PE_RANKS, n_cand = 0;
    const int64_t *m = p->m;
    hist[0] -= p->unloaded; /* lanes not loaded have key 0 */
    uint32_t bin = (uint32_t)pick_bin(hist, (int)top + 1, budget, &above), prefix = bin << 21;
    if (p->monotone && bin) /* an input's keys in the bin are one run of ranks [k0, k1) */
        for (int64_t r = 0; r < n; r += PE_RANKS) {
            /* counted, not searched: no branch on the data */
            int k0 = prefix_len(ge_mask32(key + r, (bin + 1) << 21)),
                k1 = prefix_len(ge_mask32(key + r, bin << 21));
            lanes4 v = {0, 1, 2, 3}; /* all 16 written (4 stores), the run kept (cand has room) */
            v += (int32_t)(r + k0);
            for (int q = 0; q < PE_RANKS / 4; q++, v += 4)
                memcpy(cand + n_cand + 4 * q, &v, sizeof v);
            n_cand += k1 - k0;
        }
    else
        for (int64_t r = 0; r < n; r++) { /* branch-free: the test is unpredictable */
            cand[n_cand] = (uint32_t)r;
            n_cand += (key[r] >> 21) == bin && (bin || (r & 15) < p->n_loaded[r >> 4]);
        }
    for (int ps = 1; ps < 4; ps++) {
        uint32_t mask = (1u << bits[ps]) - 1;
        memset(hist, 0, sizeof(int64_t) << bits[ps]);
        for (int64_t t = 0; t < n_cand; t++)
            hist[(key[cand[t]] >> shift[ps]) & mask] += m[cand[t] & 15];
        bin = (uint32_t)pick_bin(hist, 1 << bits[ps], budget, &above);
        prefix |= bin << shift[ps];
        int64_t kept = 0;
        for (int64_t t = 0; t < n_cand; t++)
            if (((key[cand[t]] >> shift[ps]) & mask) == bin) cand[kept++] = cand[t];
        n_cand = kept;
    }
    return prefix;
}

/* ---------------------------------------------------------------- probed cutoff
 * For a monotone matrix of fewer than 32768 inputs the same c is found by probing instead of a
 * histogram: the keys' top 16 bits (a float's sign, exponent and 7 mantissa bits) are bisected
 * with vector compares counted per rank (no scatter: 6 SSE2 operations per input and probe)
 * until few keys lie in the bracket; those candidates are then bisected on their whole keys.
 * c is still the largest key with weight(key >= c) >= budget: only the way there changes.
 * x86-64 uses SSE2 (its baseline); other targets the same steps in plain C. */

#define PROBE_MAX_INPUTS 32767 /* per-rank counts are int16 */
#define PROBE_CANDIDATES 64    /* bisect the top 16 bits until about this few keys lie between */
#ifndef PF_STATS
#define PF_STATS 16 /* statistics prefetched this many inputs (a line each) ahead */
#endif

/* keys (16 per input, slot order) of x and their top 16 bits (k16: keys < 2^31, so signed);
 * returns the largest top (rank 0 holds an input's largest key). */
static int16_t keys_and_tops(const pe_packed *p, const float *x, uint32_t *key, int16_t *k16) {
    int16_t top = 0;
    for (int64_t i = 0; i < p->n_in; i++) {
        const float *st = p->stats + i * PE_RANKS;
        uint32_t *ki = key + i * PE_RANKS;
        __builtin_prefetch(st + PF_STATS * PE_RANKS); /* read cold in decoding */
        int16_t *hi = k16 + i * PE_RANKS;
#if defined(__AVX2__)
        __m256 ax = _mm256_set1_ps(fabsf(x[i]));
        __m256i k0 = _mm256_castps_si256(_mm256_mul_ps(ax, _mm256_loadu_ps(st))),
                k1 = _mm256_castps_si256(_mm256_mul_ps(ax, _mm256_loadu_ps(st + 8)));
        _mm256_storeu_si256((__m256i *)ki, k0);
        _mm256_storeu_si256((__m256i *)(ki + 8), k1);
        k0 = _mm256_srai_epi32(k0, 16);
        k1 = _mm256_srai_epi32(k1, 16);
        /* the in-lane pack leaves 64-bit quarters in the order ranks 0-3, 8-11, 4-7, 12-15 */
        __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(k0, k1), 0xD8);
        _mm256_storeu_si256((__m256i *)hi, h);
        int16_t t0 = (int16_t)_mm256_cvtsi256_si32(k0); /* rank 0's top */
#elif defined(__SSE2__)
        __m128 ax = _mm_set1_ps(fabsf(x[i]));
        __m128i k[4];
        for (int q = 0; q < 4; q++) {
            k[q] = _mm_castps_si128(_mm_mul_ps(ax, _mm_loadu_ps(st + 4 * q)));
            _mm_storeu_si128((__m128i *)(ki + 4 * q), k[q]);
            k[q] = _mm_srai_epi32(k[q], 16);
        }
        _mm_storeu_si128((__m128i *)hi, _mm_packs_epi32(k[0], k[1]));
        _mm_storeu_si128((__m128i *)(hi + 8), _mm_packs_epi32(k[2], k[3]));
        int16_t t0 = (int16_t)_mm_cvtsi128_si32(k[0]); /* rank 0's top */
#else
        float ax = fabsf(x[i]), s[PE_RANKS];
        for (int k = 0; k < PE_RANKS; k++) s[k] = ax * st[k];
        memcpy(ki, s, sizeof s);
        for (int k = 0; k < PE_RANKS; k++) hi[k] = (int16_t)(ki[k] >> 16);
        int16_t t0 = hi[0];
#endif
        top = t0 > top ? t0 : top;
    }
    return top;
}

/* The weight (sum of m) of the keys whose top 16 bits are >= t (1 <= t <= 32767). */
static int64_t weight_from(const pe_packed *p, const int16_t *k16, int32_t t) {
    int16_t cnt[PE_RANKS]; /* keys >= t per rank: at most n_in < 2^15 */
#if defined(__AVX2__)
    __m256i tv = _mm256_set1_epi16((int16_t)(t - 1)), a0 = _mm256_setzero_si256(), a1 = a0,
            a2 = a0, a3 = a0;
    int64_t i = 0, n = p->n_in;
    const __m256i *k = (const __m256i *)k16; /* one input per vector */
    for (; i + 3 < n; i += 4) { /* four chains of adds */
        a0 = _mm256_sub_epi16(a0, _mm256_cmpgt_epi16(_mm256_loadu_si256(k + i), tv));
        a1 = _mm256_sub_epi16(a1, _mm256_cmpgt_epi16(_mm256_loadu_si256(k + i + 1), tv));
        a2 = _mm256_sub_epi16(a2, _mm256_cmpgt_epi16(_mm256_loadu_si256(k + i + 2), tv));
        a3 = _mm256_sub_epi16(a3, _mm256_cmpgt_epi16(_mm256_loadu_si256(k + i + 3), tv));
    }
    for (; i < n; i++) a0 = _mm256_sub_epi16(a0, _mm256_cmpgt_epi16(_mm256_loadu_si256(k + i), tv));
    _mm256_storeu_si256((__m256i *)cnt,
                        _mm256_add_epi16(_mm256_add_epi16(a0, a1), _mm256_add_epi16(a2, a3)));
#elif defined(__SSE2__)
    __m128i tv = _mm_set1_epi16((int16_t)(t - 1)), a0 = _mm_setzero_si128(), a1 = a0, b0 = a0,
            b1 = a0;
    int64_t i = 0, n = p->n_in;
    for (; i + 1 < n; i += 2) { /* two inputs per step: two chains of adds */
        const __m128i *k = (const __m128i *)(k16 + 16 * i);
        a0 = _mm_sub_epi16(a0, _mm_cmpgt_epi16(_mm_loadu_si128(k), tv)); /* -1 where true */
        a1 = _mm_sub_epi16(a1, _mm_cmpgt_epi16(_mm_loadu_si128(k + 1), tv));
        b0 = _mm_sub_epi16(b0, _mm_cmpgt_epi16(_mm_loadu_si128(k + 2), tv));
        b1 = _mm_sub_epi16(b1, _mm_cmpgt_epi16(_mm_loadu_si128(k + 3), tv));
    }
    if (i < n) {
        const __m128i *k = (const __m128i *)(k16 + 16 * i);
        a0 = _mm_sub_epi16(a0, _mm_cmpgt_epi16(_mm_loadu_si128(k), tv));
        a1 = _mm_sub_epi16(a1, _mm_cmpgt_epi16(_mm_loadu_si128(k + 1), tv));
    }
    _mm_storeu_si128((__m128i *)cnt, _mm_add_epi16(a0, b0));
    _mm_storeu_si128((__m128i *)(cnt + 8), _mm_add_epi16(a1, b1));
#else
    memset(cnt, 0, sizeof cnt);
    for (int64_t r = 0; r < p->n_in * PE_RANKS; r++) cnt[r & 15] += k16[r] >= t;
#endif
    int64_t w = 0;
    for (int k = 0; k < PE_RANKS; k++) w += p->m[k] * cnt[k];
    return w;
}

/* The exact cut among the candidates (slots in cand, keys in [lo, hi) with weight(key >= lo)
 * >= budget > above = weight(key >= hi)): bisection on the whole keys, the list filtered to
 * the half that holds c at each step. */
static uint32_t bisect_candidates(const pe_packed *p, const uint32_t *key, uint32_t *cand,
                                  int64_t n_cand, uint32_t lo, uint32_t hi, int64_t above,
                                  double budget) {
    while (hi - lo > 1 && n_cand > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        int64_t w = above, kept = 0;
        for (int64_t t = 0; t < n_cand; t++) w += key[cand[t]] >= mid ? p->m[cand[t] & 15] : 0;
        int up = (double)w >= budget; /* c >= mid: keep [mid, hi) */
        for (int64_t t = 0; t < n_cand; t++) {
            uint32_t k = key[cand[t]];
            cand[kept] = cand[t];
            kept += up ? k >= mid : k < mid;
        }
        n_cand = kept;
        if (up) lo = mid;
        else hi = mid, above = w;
    }
    /* c is the largest key >= lo with weight(key >= c) >= budget: here one candidate is left
     * (or several equal ones), and it is c */
    return n_cand ? key[cand[0]] : lo;
}

/* The cutoff of a monotone matrix (total >= budget > 0) by probing; fills key. scratch2 holds
 * 16 n_in + 16 uint32: the candidates from its start, the top bits in its upper half (input
 * i's candidates, written after its tops are read, end before input i + 1's tops begin). */
static uint32_t probed_cutoff(const pe_packed *p, const float *x, uint32_t *key,
                              uint32_t *scratch2, int64_t total, double budget) {
    int16_t *k16 = (int16_t *)(scratch2 + 8 * p->n_in + 16);
    int16_t top = keys_and_tops(p, x, key, k16);
    /* weight(top16 >= lo) >= budget > weight(top16 >= hi); lo = 0 counts every loaded key */
    int32_t lo = 0, hi = top + 1;
    int64_t w_lo = total, w_hi = 0, m_min = p->m[PE_RANKS - 1] < 1 ? 1 : p->m[PE_RANKS - 1];
    /* down from the top an octave (128 steps of the top bits) at a time, doubling: c lies a
     * few octaves below the largest key; then bisection */
    for (int32_t step = 128; hi - step > lo; step *= 2) {
        int64_t w = weight_from(p, k16, hi - step);
        if ((double)w >= budget) {
            lo = hi - step, w_lo = w;
            break;
        }
        hi -= step, w_hi = w;
    }
    while (hi - lo > 1 && (w_lo - w_hi) / m_min > PROBE_CANDIDATES) {
        int32_t mid = lo + (hi - lo) / 2;
        int64_t w = weight_from(p, k16, mid);
        if ((double)w >= budget) lo = mid, w_lo = w;
        else hi = mid, w_hi = w;
    }
    /* the candidates: an input's keys with top 16 bits in [lo, hi) are one run of its loaded
     * ranks [k0, k1) */
    uint32_t *cand = scratch2;
    int64_t n_cand = 0;
    for (int64_t i = 0; i < p->n_in; i++) {
        int k0 = prefix_len(ge_mask16(k16 + i * PE_RANKS, hi)), nl = p->n_loaded[i];
        int k1 = lo ? prefix_len(ge_mask16(k16 + i * PE_RANKS, lo)) : nl;
        k1 = k1 < nl ? k1 : nl;
        for (int k = k0; k < k1; k++) cand[n_cand++] = (uint32_t)(i * PE_RANKS + k);
    }
    return bisect_candidates(p, key, cand, n_cand, (uint32_t)lo << 16, (uint32_t)hi << 16, w_hi,
                             budget);
}

/* keys of x in slot order and the cutoff c at effort (dispatch: key >= c); PE_OK, or
 * PE_ERR_NONFINITE. *none set when nothing is dispatched (effort <= 0). */
static pe_status packed_cutoff(const pe_packed *p, const float *x, double effort, int n_threads,
                               uint32_t *key, uint32_t *cand, uint32_t *c, int *none) {
    int64_t n_in = p->n_in, total = -p->unloaded;
    if (!all_finite(x, n_in)) return PE_ERR_NONFINITE;
    *none = !(effort > 0.0);
    if (*none) return PE_OK;
    for (int k = 0; k < PE_RANKS; k++) total += p->m[k] * n_in;
    double budget = effort * (double)(p->n_in * p->n_out);
    *c = 0u; /* every loaded row: no keys needed (dispatched() knows) */
    /* every row is needed; at total = budget too, unless padding rows (m = 0) would join */
    if ((double)total < budget || ((double)total == budget && p->n_out % PE_GROUP == 0))
        return PE_OK;
    if (p->monotone && p->n_in <= PROBE_MAX_INPUTS && p->n_in < 2 * SPLIT_MIN_INPUTS) {
        *c = probed_cutoff(p, x, key, cand, total, budget);
        return PE_OK;
    }
    int64_t hist[2048];
    uint32_t top = all_keys_and_digits(p, x, n_threads, key, hist);
    *c = radix_cutoff_packed(p, key, cand, hist, top, budget);
    return PE_OK;
}

/* Dispatched ranks of input i: bits k < n_loaded with key >= c. */
static uint32_t dispatched(const pe_packed *p, const uint32_t *key, int64_t i, uint32_t c) {
    const uint32_t *ki = key + i * PE_RANKS;
    /* c = 0: every key (>= +0) is at or above it */
    uint32_t mask = c ? ge_mask32(ki, c) : 0xFFFFu;
    return mask & ((1u << p->n_loaded[i]) - 1);
}

/* Ranks whose slot in the last group is padding (no multiplication; n_out % 16 > 0). */
static uint32_t padding_ranks(const pe_packed *p) {
    int tail = (int)(p->n_out % PE_GROUP);
    return tail ? 0xFFFFu & ~((1u << tail) - 1) : 0u;
}

/* pe_select_items' pass for a monotone matrix: input i dispatches its K ranks with key >= c (a
 * prefix, counted; c = 0: all its loaded ranks), so its mask, class and multiplications follow
 * from K alone. */
static void monotone_items(const pe_packed *p, const float *x, const uint32_t *key, uint32_t c,
                           pe_item *items, int64_t end[PE_CLASSES], int64_t *n_rows,
                           int64_t *mults) {
    static const int8_t class_of[PE_RANKS + 1] = {1, 1, 1, 1, 0, 3, 3, 3, 2,
                                                   5, 5, 5, 4, 7, 7, 7, 6};
    int tail = (int)(p->n_out % PE_GROUP); /* ranks >= tail have a padding slot (tail > 0) */
    int64_t ranks = 0, padding = 0;
    for (int64_t i = 0; i < p->n_in; i++) {
        int k = c ? prefix_len(ge_mask32(key + i * PE_RANKS, c)) : PE_RANKS, nl = p->n_loaded[i];
        k = k < nl ? k : nl;
        ranks += k;
        padding += tail && k > tail ? k - tail : 0;
        /* written whether dispatched or not, kept only if so (k = 0 writes past class 1's end:
         * room, as below) */
        pe_item *it = items + end[class_of[k]];
        it->input = (int32_t)i;
        it->mask = (1u << k) - 1;
        it->x = x[i];
        end[class_of[k]] += k != 0;
    }
    *n_rows = ranks;
    *mults = ranks * p->n_groups - padding;
}

/* kernels.h's pe_select_fn. */
pe_status PE_SELECT_FN(const pe_packed *p, const float *x, double effort, int n_threads,
                       pe_item *items, int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES],
                       int64_t *n_rows, int64_t *mults, uint32_t *scratch) {
    uint32_t tail_mask = padding_ranks(p), *key = scratch, c = 0;
    int64_t ranks = 0, padding = 0; /* dispatched rows, and their padding slots */
    int none = 0;
    for (int cl = 0; cl < PE_CLASSES; cl++) begin[cl] = end[cl] = cl * p->n_in;
    *n_rows = *mults = 0;
    pe_status st =
        packed_cutoff(p, x, effort, n_threads, key, scratch + p->n_in * PE_RANKS, &c, &none);
    if (st != PE_OK || none) return st;
    if (p->monotone) { /* c = 0 (effort 1): every loaded rank, a prefix too */
        monotone_items(p, x, key, c, items, end, n_rows, mults);
        return PE_OK;
    }
    for (int64_t i = 0; i < p->n_in; i++) { /* one pass: each class has room for every input */
        uint32_t mask = dispatched(p, key, i, c);
        ranks += pe_popcount(mask);
        padding += pe_popcount(mask & tail_mask);
        /* written whether dispatched or not, kept only if so (about 1 in 4 inputs is not, at
         * random: a branch would miss often). An empty mask writes past the end of class 1,
         * which then has room: not every input is in it. */
        int cl = pe_item_class(mask + (mask == 0));
        pe_item *it = items + end[cl];
        it->input = (int32_t)i;
        it->mask = mask;
        it->x = x[i];
        end[cl] += mask != 0;
    }
    *n_rows = ranks;
    *mults = ranks * p->n_groups - padding;
    return PE_OK;
}
