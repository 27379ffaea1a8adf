/* x86-64 CPU features, read once by dispatch.c: cpuid for what the CPU has, xgetbv for what
 * the OS saves (AVX and AVX-512 registers). */
#include <cpuid.h>
#include <stdio.h>

#include "kernels.h"

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

unsigned pe_cpu_detect(char *names, size_t n) {
    unsigned a, b, c, d;
    int fma = 0, f16c = 0, os_avx = 0, os_zmm = 0, avx2 = 0, f = 0, bw = 0, vl = 0, dq = 0;
    int vbmi2 = 0, bmi2 = 0;
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
        avx2 = (b >> 5) & 1;
        bmi2 = (b >> 8) & 1;
        f = (b >> 16) & 1;
        dq = (b >> 17) & 1;
        bw = (b >> 30) & 1;
        vl = (b >> 31) & 1;
        vbmi2 = (c >> 6) & 1;
    }
    snprintf(names, n, "%s%s%s%s%s%s%s%s%s", avx2 && os_avx ? "avx2 " : "", fma ? "fma " : "",
             f16c ? "f16c " : "", f && os_zmm ? "avx512f " : "", bw && os_zmm ? "avx512bw " : "",
             vl && os_zmm ? "avx512vl " : "", dq && os_zmm ? "avx512dq " : "",
             vbmi2 && os_zmm ? "avx512vbmi2 " : "", os_avx ? "" : "(no OS AVX state) ");
    for (char *s = names; *s; s++) /* no trailing space */
        if (*s == ' ' && !s[1]) *s = 0;
    unsigned feats = 0;
    if (os_avx && avx2 && fma && f16c) feats |= PE_CPU_AVX2;
    if ((feats & PE_CPU_AVX2) && os_zmm && f && bw && vl && dq) feats |= PE_CPU_AVX512;
    if ((feats & PE_CPU_AVX512) && vbmi2 && bmi2) feats |= PE_CPU_AVX512VBMI2; /* pext too */
    return feats;
}
