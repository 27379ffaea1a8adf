/* One decoding step's vector work between the model's matrix products, in float32: RMSNorm,
 * the SwiGLU activation, rotary embedding, and one query's attention over the KV cache.
 * Portable C: reductions keep LANES partial sums so the compiler vectorises them without
 * reassociating. The spec is reference.rmsnorm / silu_mul / rope / attend (numpy); results
 * agree to float32 rounding. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pyeffort.h"

#if defined(__GNUC__) && !defined(__clang__)
/* No code here reads the floating-point exception flags: let GCC turn the exponential's
 * compares into vector selects (the same results; with traps assumed, its loops stay scalar). */
#pragma GCC optimize("no-trapping-math")
#endif

#define LANES 8

/* sum of a[i] * b[i], i < n */
static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0}, s = 0.0f;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* e^x for x <= 0 (a softmax score less its maximum), relative error below 3e-7; the result
 * is 0 below -87 (e^-87 < 2e-38). Cephes' expf polynomial, in branch-free code that vectorises. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    int32_t n = (int32_t)(xc * 1.44269504088896341f - 0.5f); /* round(x / ln 2), x <= 0 */
    float r = xc - (float)n * 0.693359375f + (float)n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = (n + 127) << 23; /* 2^n, n >= -126 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale * (float)(x >= -87.0f); /* a product, not a branch: loops vectorise */
}

/* g, u (n,) -> out (n,): silu(g) * u = g / (1 + e^-g) * u, the sigmoid from e^-|g| (so the
 * exponential never overflows) */
void pe_silu_mul_f32(const float *g, const float *u, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float e = exp_nonpositive(-fabsf(g[i])), pos = (float)(g[i] >= 0.0f);
        float sig = (pos + (1.0f - pos) * e) / (1.0f + e); /* 1 / (1 + e) or e / (1 + e) */
        out[i] = g[i] * sig * u[i];
    }
}

/* x (n,) -> out (n,): x / sqrt(mean(x^2) + eps) * w */
void pe_rmsnorm_f32(const float *x, const float *w, int64_t n, float eps, float *out) {
    float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* x (heads, hd) rotated in place at one position: the pairs (j, j + hd/2) by the angles whose
 * cos, sin (hd/2,) are given ("rotate half" layout). */
void pe_rope_f32(float *x, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    int64_t h = hd / 2;
    for (int64_t t = 0; t < heads; t++) {
        float *a = x + t * hd, *b = a + h;
        for (int64_t j = 0; j < h; j++) {
            float aj = a[j], bj = b[j];
            a[j] = aj * cos[j] - bj * sin[j];
            b[j] = bj * cos[j] + aj * sin[j];
        }
    }
}

/* The attention of one head: q (hd,) over keys k, values v (S, hd) -> o (hd,); p (S,) scratch. */
static void attend_head(const float *q, const float *k, const float *v, int64_t S, int64_t hd,
                        float scale, float *p, float *o) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        p[j] = dot(q, k + j * hd, hd) * scale;
        m = p[j] > m ? p[j] : m;
    }
    for (int64_t j = 0; j < S; j++) {
        p[j] = exp_nonpositive(p[j] - m);
        sum += p[j];
    }
    memset(o, 0, sizeof(float) * (size_t)hd);
    for (int64_t j = 0; j < S; j++) {
        float pj = p[j] / sum;
        for (int64_t d = 0; d < hd; d++) o[d] += pj * v[j * hd + d];
    }
}

/* One query per head, q (n_heads, hd), against the cached keys and values k, v (n_kv, cap, hd)
 * at positions [lo, end) -> out (n_heads, hd); head t reads kv head t / (n_heads / n_kv);
 * softmax of scale * q.k. PE_ERR_ARG if the sizes disagree, PE_ERR_ALLOC. */
pe_status pe_attend_f32(const float *q, const float *k, const float *v, int64_t n_heads,
                        int64_t n_kv, int64_t cap, int64_t hd, int64_t lo, int64_t end,
                        float scale, float *out) {
    if (n_kv < 1 || n_heads % n_kv || lo < 0 || end <= lo || end > cap || hd < 1)
        return PE_ERR_ARG;
    float *p = malloc(sizeof(float) * (size_t)(end - lo));
    if (!p) return PE_ERR_ALLOC;
    int64_t rep = n_heads / n_kv;
    for (int64_t t = 0; t < n_heads; t++) {
        int64_t base = ((t / rep) * cap + lo) * hd;
        attend_head(q + t * hd, k + base, v + base, end - lo, hd, scale, p, out + t * hd);
    }
    free(p);
    return PE_OK;
}
