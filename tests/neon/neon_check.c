/* Checks the NEON kernels against the portable ones on fixed and random inputs, odd sizes
 * included: the fp16 effort kernel (on the permuted copy) against the permuted copy's scalar
 * kernel (scalar-permuted) and the canonical spec (scalar); the q8 effort kernel (on the q8
 * tiered copy) bit for bit against scalar-tiered's and within float32 rounding against the
 * canonical q8 spec (scalar); the dense ones (fp16 and Q8_0) against scalar: the same
 * dispatched rows, mults and bytes, results within float32 rounding (2e-6 of the largest
 * output: NEON rounds x * w before each add where scalar-permuted fuses them for whole tiers),
 * and bitwise identical results for 1 and 3 threads; damaged matrices refused
 * (PE_ERR_FORMAT). Exit status 0 if all pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp16.h"
#include "kernels.h"

static uint64_t rng_state = 12345;
static double uniform(void) { /* xorshift64*, in [0, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}
static double normal(void) { return sqrt(-2 * log(uniform() + 1e-300)) * cos(6.283185307 * uniform()); }

static uint16_t to_f16(float f) { /* round to nearest even, normal range only (|f| < 65504) */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000, exp = (b >> 23) & 0xFF, man = b & 0x7FFFFF;
    if (exp < 103) return (uint16_t)sign;
    if (exp < 113) { /* subnormal half */
        man |= 0x800000;
        int shift = 126 - (int)exp;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((exp - 112) << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static int failures;
static void expect(int ok, const char *what, int64_t n_in, int64_t n_out, double e, double err) {
    if (!ok) {
        failures++;
        printf("FAIL %s n_in=%lld n_out=%lld effort=%g err=%g\n", what, (long long)n_in,
               (long long)n_out, e, err);
    }
}

/* max |a - b| / max |b| where b is finite; inf if a and b differ in finiteness anywhere. */
static double rel_err(const float *a, const float *b, int64_t n) {
    double d = 0, m = 1e-30;
    for (int64_t j = 0; j < n; j++) {
        if (isfinite(a[j]) != isfinite(b[j])) return INFINITY;
        if (!isfinite(b[j])) continue;
        d = fmax(d, fabs((double)a[j] - b[j]));
        m = fmax(m, fabs((double)b[j]));
    }
    return d / m;
}

/* b packed for kernel set `kernels` (pe_pack builds the layout that set reads); neon selected
 * after. NULL (a failure counted) if packing fails. */
static pe_packed *pack_for(const char *kernels, const pe_buckets *b) {
    pe_packed *pk = NULL;
    pe_use_kernel(kernels);
    if (pe_pack(b, &pk) != PE_OK) expect(0, "pack", b->n_in, b->n_out, 0, 0);
    pe_use_kernel("neon");
    return pk;
}

/* x (T, n_in) @ b through pk (neon; 1 and 3 threads) vs through spec (a portable set, 1 thread)
 * at every effort: same mults and bytes, results within float32 rounding (bit for bit if
 * exact; the same outputs not finite), and bitwise identical for both thread counts. */
static void compare(const pe_buckets *b, pe_packed *pk, pe_packed *spec, const float *x,
                    int64_t T, const char *what, int exact) {
    static const double efforts[] = {0.0, 0.01, 0.05, 0.25, 0.5, 1.0};
    int64_t n_in = b->n_in, n_out = b->n_out;
    float *ys = malloc(4 * (size_t)(T * n_out)), *yn = malloc(4 * (size_t)(T * n_out));
    float *y3 = malloc(4 * (size_t)(T * n_out));
    const char *copy = b->kind == PE_VALUES_Q8 ? "tiered" : "permuted";
    expect(!strcmp(pe_packed_copy(pk), copy), "neon copy", n_in, n_out, 0, 0);
    for (int e = 0; e < 6; e++) {
        int64_t ms = 0, bs = 0, mn = 0, bn = 0, m3 = 0, b3 = 0;
        pe_set_num_threads(1);
        pe_bucketmul(spec, b, x, T, efforts[e], ys, &ms, &bs);
        pe_bucketmul(pk, b, x, T, efforts[e], yn, &mn, &bn);
        pe_set_num_threads(3);
        pe_bucketmul(pk, b, x, T, efforts[e], y3, &m3, &b3);
        double err = rel_err(yn, ys, T * n_out);
        expect(ms == mn && bs == bn, "mults/bytes", n_in, n_out, efforts[e], (double)(ms - mn));
        expect(err <= 2e-6, what, n_in, n_out, efforts[e], err);
        if (exact) expect(!memcmp(yn, ys, 4 * (size_t)(T * n_out)), what, n_in, n_out, efforts[e], err);
        expect(!memcmp(yn, y3, 4 * (size_t)(T * n_out)), "threads", n_in, n_out, efforts[e], 0);
    }
    free(ys); free(yn); free(y3);
}

/* x through the neon set vs both portable specs of it (q8: scalar-tiered's kernel, bit for
 * bit, and the canonical spec). */
static void compare_specs(const pe_buckets *b, const float *x, int64_t T, const char *what) {
    int q8 = b->kind == PE_VALUES_Q8;
    pe_packed *pk = pack_for("neon", b), *pp = pack_for(q8 ? "scalar-tiered" : "scalar-permuted", b);
    pe_packed *pc = pack_for("scalar", b);
    if (pk && pp) compare(b, pk, pp, x, T, what, q8);
    if (pk && pc) compare(b, pk, pc, x, T, what, 0);
    pe_packed_free(pk);
    pe_packed_free(pp);
    pe_packed_free(pc);
}

/* All weights 1/2 and x = 1 through the permuted copy: every output is n_in / 2 at effort 1. */
static void check_fixed(const pe_buckets *b, const float *x) {
    int64_t m = 0, by = 0, n_in = b->n_in, n_out = b->n_out;
    float *y = malloc(4 * (size_t)n_out);
    pe_packed *pk = pack_for("neon", b);
    if (pk) {
        expect(!strcmp(pe_packed_copy(pk), "permuted"), "fixed copy", n_in, n_out, 1.0, 0);
        pe_bucketmul(pk, b, x, 1, 1.0, y, &m, &by);
        for (int64_t j = 0; j < n_out; j++)
            expect(y[j] == 0.5f * (float)n_in, "fixed", n_in, n_out, 1.0, y[j]);
        expect(m == n_in * n_out, "fixed mults", n_in, n_out, 1.0, (double)m);
    }
    pe_packed_free(pk);
    free(y);
}

/* The smallest fp16 s with 127 s >= m (m >= 0, normal range): reference.q8_scale. */
static uint16_t q8_scale(float m) {
    uint16_t s = to_f16(m / 127.0f);
    return pe_f16_to_f32(s) * 127.0f < m ? (uint16_t)(s + 1) : s;
}

/* fp16 rows v (rows, G) of order o -> int8 rows q and scales sc (4 n_in, ceil(G / 4)), as
 * reference.quantise_q8: per tier of an input and chunk of 4 groups one scale, row t n_in + j
 * for input o[4t, j]; q = rint(w / scale) (0 where the scale is 0). */
static void quantise_q8(const uint16_t *v, const int32_t *o, int64_t n_in, int64_t G, int8_t *q,
                        uint16_t *sc) {
    int64_t C = (G + 3) / 4, *at = malloc(sizeof(int64_t) * (size_t)(16 * n_in));
    for (int64_t r = 0; r < 16 * n_in; r++) at[(r / n_in) * n_in + o[r]] = r; /* (k, i) -> row */
    for (int64_t t = 0; t < 4; t++)
        for (int64_t j = 0; j < n_in; j++)
            for (int64_t c = 0; c < C; c++) {
                int64_t i = o[4 * t * n_in + j], g1 = 4 * c + 4 < G ? 4 * c + 4 : G;
                float m = 0;
                for (int64_t k = 4 * t; k < 4 * t + 4; k++)
                    for (int64_t g = 4 * c; g < g1; g++)
                        m = fmaxf(m, fabsf(pe_f16_to_f32(v[at[k * n_in + i] * G + g])));
                uint16_t s = q8_scale(m);
                sc[(t * n_in + j) * C + c] = s;
                for (int64_t k = 4 * t; k < 4 * t + 4; k++)
                    for (int64_t g = 4 * c; g < g1; g++) {
                        int64_t r = at[k * n_in + i];
                        float w = pe_f16_to_f32(v[r * G + g]), f = pe_f16_to_f32(s);
                        q[r * G + g] = (int8_t)(f > 0 ? fmaxf(-127, fminf(127, rintf(w / f))) : 0);
                    }
            }
    free(at);
}

/* Rows of scales a prefix of n_rows bucket rows reads (reference.scale_rows). */
static int64_t scale_rows(int64_t n_rows, int64_t n_in) {
    int64_t t = n_rows / (4 * n_in), s = t * n_in + (n_rows - 4 * t * n_in < n_in ? n_rows - 4 * t * n_in : n_in);
    return s < 4 * n_in ? s : 4 * n_in;
}

/* One matrix: fixed (all weights 1/2, x = 1) or random, at several efforts and loads. */
static void check(int64_t n_in, int64_t n_out, int fixed) {
    int64_t G = (n_out + 15) / 16, rows = 16 * n_in, T = 2;
    uint16_t *w = malloc(2 * (size_t)(n_in * n_out)), *v = malloc(2 * (size_t)(rows * G));
    uint8_t *p = malloc((size_t)(rows * ((G + 1) / 2)));
    float *st = malloc(4 * (size_t)rows), *x = malloc(4 * (size_t)(T * n_in));
    int32_t *o = malloc(4 * (size_t)rows), *sel = malloc(4 * (size_t)n_in);
    float *ys = malloc(4 * (size_t)(T * n_out)), *yn = malloc(4 * (size_t)(T * n_out));
    for (int64_t i = 0; i < n_in * n_out; i++) w[i] = to_f16(fixed ? 0.5f : (float)(0.05 * normal()));
    for (int64_t i = 0; i < T * n_in; i++)
        x[i] = fixed ? 1.0f : (i % 7 == 0 ? 0.0f : (float)(normal() * -log(uniform() + 1e-9)));
    pe_build_f16(w, n_in, n_out, v, p, st, o);
    if (fixed) check_fixed(&(pe_buckets){v, p, st, o, n_in, n_out, G, rows}, x);
    static const double loads[] = {1.0, 0.6, 0.3, 0.1}; /* loaded ranks: 16, 9-10, 4-5, 1-2 */
    int64_t C = (G + 3) / 4;
    int8_t *q = malloc((size_t)(rows * G));
    uint16_t *sc = malloc(2 * (size_t)(4 * n_in * C)), *part = malloc(2 * (size_t)(4 * n_in * C));
    quantise_q8(v, o, n_in, G, q, sc);
    for (int l = 0; l < 4; l++) {
        int64_t n_rows = (int64_t)(loads[l] * (double)rows), k = scale_rows(n_rows, n_in);
        pe_buckets b = {v, p, st, o, n_in, n_out, G, n_rows};
        compare_specs(&b, x, T, "perm_neon");
        /* the scale rows past the loaded prefix are NaN: never read (else refused) */
        for (int64_t e = 0; e < 4 * n_in * C; e++) part[e] = e < k * C ? sc[e] : 0x7E00;
        pe_buckets b8 = {q, p, st, o, n_in, n_out, G, n_rows, part, PE_VALUES_Q8};
        compare_specs(&b8, x, T, "tiers_q8_neon");
    }
    free(q);
    free(sc);
    free(part);
    int64_t n_sel = 0;
    for (int64_t i = n_in - 1; i >= 0; i -= 2) sel[n_sel++] = (int32_t)i; /* any order */
    for (int rows_case = 0; rows_case < 2; rows_case++) {
        pe_use_kernel("scalar");
        pe_set_num_threads(1);
        if (rows_case) pe_dense_rows_f16(x, w, T, n_in, n_out, sel, n_sel, ys);
        else pe_dense_f16(x, w, T, n_in, n_out, ys);
        pe_use_kernel("neon");
        pe_set_num_threads(3);
        if (rows_case) pe_dense_rows_f16(x, w, T, n_in, n_out, sel, n_sel, yn);
        else pe_dense_f16(x, w, T, n_in, n_out, yn);
        double err = rel_err(yn, ys, T * n_out);
        expect(err <= 2e-6, rows_case ? "dense_rows" : "dense", n_in, n_out, 1.0, err);
    }
    free(w); free(v); free(p); free(st); free(x); free(o); free(sel); free(ys); free(yn);
}

/* The dense Q8_0 product at odd sizes: neon (1 and 3 threads) against scalar, within float32
 * rounding, and bitwise identical for both thread counts. */
static void check_dense_q8(int64_t n_in, int64_t n_out) {
    int64_t T = 2, nb = (n_in + 31) / 32;
    int8_t *q = malloc((size_t)(n_in * n_out));
    uint16_t *s = malloc(2 * (size_t)(nb * n_out));
    float *x = malloc(4 * (size_t)(T * n_in)), *ys = malloc(4 * (size_t)(T * n_out));
    float *yn = malloc(4 * (size_t)(T * n_out)), *y3 = malloc(4 * (size_t)(T * n_out));
    for (int64_t i = 0; i < n_in * n_out; i++) q[i] = (int8_t)(uniform() * 255.0 - 127.0);
    for (int64_t i = 0; i < nb * n_out; i++) s[i] = to_f16((float)(0.01 * uniform()));
    for (int64_t i = 0; i < T * n_in; i++) x[i] = (float)normal();
    pe_use_kernel("scalar");
    pe_set_num_threads(1);
    pe_dense_q8(x, q, s, T, n_in, n_out, ys);
    pe_use_kernel("neon");
    pe_dense_q8(x, q, s, T, n_in, n_out, yn);
    pe_set_num_threads(3);
    pe_dense_q8(x, q, s, T, n_in, n_out, y3);
    double err = rel_err(yn, ys, T * n_out);
    expect(err <= 2e-6, "dense_q8", n_in, n_out, 1.0, err);
    expect(!memcmp(yn, y3, 4 * (size_t)(T * n_out)), "dense_q8 threads", n_in, n_out, 1.0, 0);
    free(q); free(s); free(x); free(ys); free(yn); free(y3);
}

/* b is damaged: every set's pe_pack returns PE_ERR_FORMAT. */
static void refused(const pe_buckets *b, const char *what) {
    static const char *const sets[] = {"neon", "scalar", "scalar-permuted", "scalar-tiered"};
    for (int s = 0; s < 4; s++) {
        pe_packed *pk = NULL;
        pe_use_kernel(sets[s]);
        expect(pe_pack(b, &pk) == PE_ERR_FORMAT && !pk, what, b->n_in, b->n_out, s, 0);
        pe_packed_free(pk);
    }
    pe_use_kernel("neon");
}

/* Files pe_build_f16 would not write: statistics that rise with rank (any rank set
 * dispatched), then damaged ones, which every set refuses: positions repeated in a group and
 * inf values. */
static void check_odd_files(int64_t n_in, int64_t n_out) {
    int64_t G = (n_out + 15) / 16, rows = 16 * n_in, T = 2, ps = (G + 1) / 2;
    uint16_t *w = malloc(2 * (size_t)(n_in * n_out)), *v = malloc(2 * (size_t)(rows * G));
    uint8_t *p = malloc((size_t)(rows * ps)), *p2 = malloc((size_t)(rows * ps));
    float *st = malloc(4 * (size_t)rows), *st2 = malloc(4 * (size_t)rows);
    float *x = malloc(4 * (size_t)(T * n_in));
    int32_t *o = malloc(4 * (size_t)rows), *at = malloc(4 * (size_t)(2 * n_in));
    uint16_t *v2 = malloc(2 * (size_t)(rows * G));
    for (int64_t i = 0; i < n_in * n_out; i++) w[i] = to_f16((float)(0.05 * normal()));
    for (int64_t i = 0; i < T * n_in; i++) x[i] = i % 7 == 0 ? 0.0f : (float)normal();
    pe_build_f16(w, n_in, n_out, v, p, st, o);
    static const float scales[] = {3.0f, 1.0000001f};
    int64_t C = (G + 3) / 4;
    int8_t *q = malloc((size_t)(rows * G)), *q2 = malloc((size_t)(rows * G));
    uint16_t *sc = malloc(2 * (size_t)(4 * n_in * C)), *sc2 = malloc(2 * (size_t)(4 * n_in * C));
    quantise_q8(v, o, n_in, G, q, sc);
    for (int s = 0; s < 2; s++) { /* ranks 1..3 above rank 0 */
        memcpy(st2, st, 4 * (size_t)rows);
        for (int64_t r = n_in; r < 4 * n_in; r++) st2[r] *= scales[s];
        pe_buckets b = {v, p, st2, o, n_in, n_out, G, rows};
        compare_specs(&b, x, T, "rising stats");
        pe_buckets b8 = {q, p, st2, o, n_in, n_out, G, rows, sc, PE_VALUES_Q8};
        compare_specs(&b8, x, T, "rising stats q8");
    }
    pe_buckets rep8 = {q, NULL, st, o, n_in, n_out, G, rows, sc, PE_VALUES_Q8};
    memcpy(q2, q, (size_t)(rows * G)); /* rank 15 of five inputs, group 1: -128 */
    for (int64_t r = rows - 5; r < rows; r++) q2[r * G + 1] = -128;
    pe_buckets low = {q2, p, st, o, n_in, n_out, G, rows, sc, PE_VALUES_Q8};
    refused(&low, "q8 -128");
    static const uint16_t bad_scales[] = {0x7C00, 0x7E00, 0xB800}; /* inf, NaN, -0.5 */
    for (int k = 0; k < 3; k++) {
        memcpy(sc2, sc, 2 * (size_t)(4 * n_in * C)); /* tier 3 of five inputs, chunk 0 */
        for (int64_t j = 4 * n_in - 5; j < 4 * n_in; j++) sc2[j * C] = bad_scales[k];
        pe_buckets bad = {q, p, st, o, n_in, n_out, G, rows, sc2, PE_VALUES_Q8};
        refused(&bad, "q8 scale");
    }
    memcpy(p2, p, (size_t)(rows * ps)); /* rank 1 of every input at rank 0's position, group 0 */
    for (int64_t r = 0; r < 2 * n_in; r++) at[(r / n_in) * n_in + o[r]] = (int32_t)r;
    for (int64_t j = 0; j < n_in; j++) {
        uint8_t *q1 = p2 + at[n_in + j] * ps, q0 = p2[at[j] * ps];
        *q1 = (uint8_t)((*q1 & 0xF0) | (q0 & 0x0F));
    }
    pe_buckets rep = {v, p2, st, o, n_in, n_out, G, rows};
    refused(&rep, "repeated positions");
    rep8.positions = p2;
    refused(&rep8, "repeated positions q8");
    memcpy(v2, v, 2 * (size_t)(rows * G)); /* rank 15 of five inputs, group 1: inf */
    for (int64_t r = rows - 5; r < rows; r++) {
        v2[r * G + 1] = 0x7C00;
        for (int64_t t = 0; t < T; t++) x[t * n_in + o[r]] = 1.0f; /* dispatched at 1.0 */
    }
    pe_buckets inf = {v2, p, st, o, n_in, n_out, G, rows};
    refused(&inf, "inf value");
    free(w); free(v); free(p); free(p2); free(st); free(st2); free(x); free(o); free(at); free(v2);
    free(q); free(q2); free(sc); free(sc2);
}

int main(void) {
    if (pe_use_kernel("neon") != PE_OK) {
        printf("FAIL the neon kernel set is not available (kernels: %s)\n", pe_available_kernels());
        return 1;
    }
    static const int64_t shapes[][2] = {{64, 40}, {5, 17}, {33, 257}, {130, 300}, {17, 3},
                                        {96, 1100}, {1, 16}, {200, 4100}, {700, 72},
                                        {3, 16500}}; /* the last: two accumulator blocks */
    for (int s = 0; s < 10; s++) {
        check(shapes[s][0], shapes[s][1], 0);
        check(shapes[s][0], shapes[s][1], 1);
    }
    static const int64_t q8_shapes[][2] = {{1, 1}, {33, 17}, {64, 40}, {333, 517},
                                           {4200, 1000}}; /* the last: threaded, 17 parts */
    for (int s = 0; s < 5; s++) check_dense_q8(q8_shapes[s][0], q8_shapes[s][1]);
    check_odd_files(60, 80);
    check_odd_files(50, 64);
    printf("%s: neon vs scalar, %d failures (kernels %s, features %s)\n",
           failures ? "FAILED" : "OK", failures, pe_available_kernels(), pe_cpu_features());
    return failures != 0;
}
