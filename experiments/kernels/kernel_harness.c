/* Times one kernel set's effort matmul on fp16 and q8 buckets of the same random weights
 * against the dense fp16 product, in C without Python: per effort, ROUNDS rounds of one call
 * each (f16, q8, dense, interleaved, each on a new x as in decoding), medians printed.
 *   harness N_IN N_OUT KERNEL THREADS     (COLD=1: caches flushed before each call) */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "fp16.h"
#include "kernels.h"

#define ROUNDS 21
static double wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static uint16_t f2h(float f) { return (uint16_t)_cvtss_sh(f, 0); }
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *t) {
    qsort(t, ROUNDS, sizeof(double), cmp);
    return t[ROUNDS / 2];
}
static char *junk;
static int cold;
static void flush(void) {
    if (cold)
        for (size_t i = 0; i < (64u << 20); i += 64) junk[i]++;
}
/* 2 MiB aligned and huge pages, as numpy does for large arrays */
static void *big(size_t n) {
    void *m;
    if (posix_memalign(&m, 2 << 20, n)) exit(1);
    madvise(m, n, MADV_HUGEPAGE);
    return m;
}

/* reference.quantise_q8: per tier of an input and chunk of 4 groups one fp16 scale (the
 * smallest with 127 s >= max |w|), row t n_in + j for input o[4t, j]; q = rint(w / s). */
static void quantise_q8(const uint16_t *v, const int32_t *o, int64_t n_in, int64_t G, int8_t *q,
                        uint16_t *sc) {
    int64_t C = (G + 3) / 4, *at = malloc(sizeof(int64_t) * (size_t)(16 * n_in));
    for (int64_t r = 0; r < 16 * n_in; r++) at[(r / n_in) * n_in + o[r]] = r;
    for (int64_t t = 0; t < 4; t++)
        for (int64_t j = 0; j < n_in; j++)
            for (int64_t c = 0; c < C; c++) {
                int64_t i = o[4 * t * n_in + j], g1 = 4 * c + 4 < G ? 4 * c + 4 : G;
                float m = 0;
                for (int64_t k = 4 * t; k < 4 * t + 4; k++)
                    for (int64_t g = 4 * c; g < g1; g++)
                        m = fmaxf(m, fabsf(pe_f16_to_f32(v[at[k * n_in + i] * G + g])));
                uint16_t s = f2h(m / 127.0f);
                if (pe_f16_to_f32(s) * 127.0f < m) s++;
                sc[(t * n_in + j) * C + c] = s;
                float f = pe_f16_to_f32(s);
                for (int64_t k = 4 * t; k < 4 * t + 4; k++)
                    for (int64_t g = 4 * c; g < g1; g++) {
                        int64_t r = at[k * n_in + i];
                        float w = pe_f16_to_f32(v[r * G + g]);
                        q[r * G + g] = (int8_t)(f > 0 ? fmaxf(-127, fminf(127, rintf(w / f))) : 0);
                    }
            }
    free(at);
}

int main(int argc, char **argv) {
    if (argc < 5) return fprintf(stderr, "harness N_IN N_OUT KERNEL THREADS\n"), 2;
    cold = getenv("COLD") != NULL;
    junk = calloc(64u << 20, 1);
    int64_t n_in = atoi(argv[1]), n_out = atoi(argv[2]), G = (n_out + 15) / 16, rows = 16 * n_in;
    int nth = atoi(argv[4]);
    uint16_t *w = big(2 * n_in * n_out), *v = big(2 * rows * G), *sc = big(2 * 4 * n_in * G);
    uint8_t *p = big(rows * ((G + 1) / 2));
    int8_t *q = big(rows * G);
    float *st = malloc(4 * rows), *xs = malloc(4 * n_in * ROUNDS), *y = malloc(4 * n_out);
    int32_t *o = malloc(4 * rows);
    srand(1);
    for (int64_t i = 0; i < n_in * n_out; i++) w[i] = f2h((rand() / (float)RAND_MAX - 0.5f) * 0.04f);
    for (int64_t i = 0; i < ROUNDS * n_in; i++) {
        float g = rand() / (float)RAND_MAX;
        xs[i] = (rand() / (float)RAND_MAX - 0.5f) * (-logf(g + 1e-6f));
    }
    pe_build_f16(w, n_in, n_out, v, p, st, o);
    quantise_q8(v, o, n_in, G, q, sc);
    pe_buckets bf = {v, p, st, o, n_in, n_out, G, rows}, bq = {q, p, st, o, n_in, n_out, G, rows,
                                                            sc, PE_VALUES_Q8};
    if (pe_use_kernel(argv[3]) != PE_OK)
        return fprintf(stderr, "no kernel set %s here: %s\n", argv[3], pe_available_kernels()), 1;
    pe_set_num_threads(nth);
    pe_packed *pf, *pq;
    if (pe_pack(&bf, &pf) != PE_OK || pe_pack(&bq, &pq) != PE_OK) return 1;
    double dense[ROUNDS];
    static const double effs[] = {1.0, 0.5, 0.25, 0.1};
    printf("%s %lldx%lld th%d (%s): median of %d interleaved calls, ms\n", argv[3],
           (long long)n_in, (long long)n_out, nth, cold ? "cold" : "warm", ROUNDS);
    for (int e = 0; e < 4; e++) {
        double tf[ROUNDS], tq[ROUNDS];
        int64_t mf = 0, bytf = 0, mq = 0, bytq = 0;
        for (int it = 0; it < ROUNDS; it++) {
            const float *x = xs + it * n_in;
            double t0;
            flush(), t0 = wall(), pe_bucketmul(pf, &bf, x, 1, effs[e], y, &mf, &bytf), tf[it] = wall() - t0;
            flush(), t0 = wall(), pe_bucketmul(pq, &bq, x, 1, effs[e], y, &mq, &bytq), tq[it] = wall() - t0;
            flush(), t0 = wall(), pe_dense_f16(x, w, 1, n_in, n_out, y), dense[it] = wall() - t0;
        }
        double f = median(tf), qq = median(tq), d = median(dense);
        printf("eff %.2f  f16 %.3f  q8 %.3f  dense %.3f  | q8/dense %.3f  f16/dense %.3f  q8/f16 "
               "%.3f | bytes/mult f16 %.3f q8 %.3f | q8 GB/s %.1f\n",
               effs[e], f * 1e3, qq * 1e3, d * 1e3, qq / d, f / d, qq / f, (double)bytf / mf,
               (double)bytq / mq, (double)bytq / ROUNDS / qq * 1e-9);
    }
    return 0;
}
