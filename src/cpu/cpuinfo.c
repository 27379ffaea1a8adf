/* CPU features, detected once (cpuid and xgetbv on x86-64; baseline NEON on arm64), and the
 * kernel sets they allow, best first. PYEFFORT_DISABLE_CPU_FEATURES=avx512vbmi2,avx512,avx2 drops
 * tiers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Appends the names of the features this machine has; sets *avx2, *avx512 (kernel tiers). */
static void detect(char *out, size_t n, int *avx2, int *avx512, int *vbmi2) {
    unsigned a, b, c, d;
    int fma = 0, f16c = 0, os_avx = 0, os_zmm = 0, has_avx2 = 0, f = 0, bw = 0, vl = 0, dq = 0;
    int vb2 = 0, bmi2 = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        fma = (c >> 12) & 1;
        f16c = (c >> 29) & 1;
        if (((c >> 27) & 1) && ((c >> 28) & 1)) { /* OSXSAVE and AVX */
            uint64_t xcr0 = xgetbv0();
            os_avx = (xcr0 & 0x6) == 0x6;
            os_zmm = os_avx && (xcr0 & 0xE0) == 0xE0;
        }
    }
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        has_avx2 = (b >> 5) & 1;
        f = (b >> 16) & 1;
        dq = (b >> 17) & 1;
        bw = (b >> 30) & 1;
        vl = (b >> 31) & 1;
        vb2 = (c >> 6) & 1;
        bmi2 = (b >> 8) & 1;
    }
    snprintf(out, n, "%s%s%s%s%s%s%s%s%s", has_avx2 && os_avx ? "avx2 " : "", fma ? "fma " : "",
             f16c ? "f16c " : "", f && os_zmm ? "avx512f " : "", bw && os_zmm ? "avx512bw " : "",
             vl && os_zmm ? "avx512vl " : "", dq && os_zmm ? "avx512dq " : "",
             vb2 && os_zmm ? "avx512vbmi2 " : "", os_avx ? "" : "(no OS AVX state) ");
    *avx2 = os_avx && has_avx2 && fma && f16c;
    *avx512 = *avx2 && os_zmm && f && bw && vl && dq;
    *vbmi2 = *avx512 && vb2 && bmi2; /* the tiered kernel also uses pext */
}
#endif

static int disabled(const char *feature) {
    const char *env = getenv("PYEFFORT_DISABLE_CPU_FEATURES");
    size_t n = strlen(feature);
    for (const char *s = env; s && *s;) {
        while (*s == ',' || *s == ' ') s++;
        size_t len = strcspn(s, ", ");
        if (len == n && strncmp(s, feature, n) == 0) return 1;
        s += len;
    }
    return 0;
}

static char features[256];
static const pe_cpu_kernels *tiers[5];
static int n_tiers;

/* Fills features and tiers once (called under pthread_once by dispatch.c). */
void pe_detect_cpu(void) {
#if defined(__x86_64__) || defined(_M_X64)
    int avx2, avx512, vbmi2;
    detect(features, sizeof features, &avx2, &avx512, &vbmi2);
    int no512 = disabled("avx512") || disabled("avx2");
    if (vbmi2 && !no512 && !disabled("avx512vbmi2")) tiers[n_tiers++] = &pe_kernels_avx512vbmi2;
    if (avx512 && !no512) tiers[n_tiers++] = &pe_kernels_avx512;
    if (avx2 && !disabled("avx2")) tiers[n_tiers++] = &pe_kernels_avx2;
#elif defined(__aarch64__)
    snprintf(features, sizeof features, "neon fp16-conversion");
    if (!disabled("neon")) tiers[n_tiers++] = &pe_kernels_neon;
#else
    snprintf(features, sizeof features, "(none used)");
#endif
    tiers[n_tiers++] = &pe_kernels_scalar;
    size_t len = strlen(features);
    if (len && features[len - 1] == ' ') features[len - 1] = 0;
}

const char *pe_cpu_features(void) { return features; }

/* The kernel sets this machine runs, best first; *n set. */
const pe_cpu_kernels *const *pe_tiers(int *n) {
    *n = n_tiers;
    return tiers;
}
