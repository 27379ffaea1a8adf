/* The kernel sets and the choice among them: the CPU's features are detected once, the
 * sets it runs are listed best first, the first is used unless pe_use_kernel names another.
 * Also the thread count every call reads once. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Every kernel set, best first: the SIMD sets, then the portable C ones. "scalar" is the
 * C-level spec (the canonical rows through the index); "scalar-tiered" and "scalar-permuted"
 * are the scalar kernels of the two in-memory layouts, the spec of the SIMD kernels that read
 * them (bit for bit). Int8 values (q8) have one copy, the tiered one, which every SIMD set
 * reads (the permuted copy holds fp16 values only): their spec is scalar-tiered's q8 kernel. */
static const pe_kernel_set sets[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {"avx512vbmi2", PE_CPU_AVX2 | PE_CPU_AVX512 | PE_CPU_AVX512VBMI2, PE_TIERED,
     pe_tiers_f16_avx512vbmi2, PE_TIERED, pe_tiers_q8_avx512vbmi2, pe_dense_f16_avx512,
     pe_dense_q8_avx512, pe_select_items_avx2},
    {"avx512", PE_CPU_AVX2 | PE_CPU_AVX512, PE_PERMUTED, pe_perm_f16_avx2, PE_TIERED,
     pe_tiers_q8_avx2, pe_dense_f16_avx512, pe_dense_q8_avx512, pe_select_items_avx2},
    {"avx2", PE_CPU_AVX2, PE_PERMUTED, pe_perm_f16_avx2, PE_TIERED, pe_tiers_q8_avx2,
     pe_dense_f16_avx2, pe_dense_q8_avx2, pe_select_items_avx2},
#endif
#if defined(__aarch64__)
    {"neon", PE_CPU_NEON, PE_PERMUTED, pe_perm_f16_neon, PE_TIERED, pe_tiers_q8_neon,
     pe_dense_f16_neon, pe_dense_q8_neon, pe_select_items},
#endif
    {"scalar", 0, PE_CANONICAL, pe_bucketmul_f16_scalar, PE_CANONICAL, pe_bucketmul_q8_scalar,
     pe_dense_f16_scalar, pe_dense_q8_scalar, pe_select_items},
    {"scalar-tiered", 0, PE_TIERED, pe_tiers_f16_scalar, PE_TIERED, pe_tiers_q8_scalar,
     pe_dense_f16_scalar, pe_dense_q8_scalar, pe_select_items},
    {"scalar-permuted", 0, PE_PERMUTED, pe_perm_f16_scalar, PE_TIERED, pe_tiers_q8_scalar,
     pe_dense_f16_scalar, pe_dense_q8_scalar, pe_select_items},
};
#define N_SETS (int)(sizeof sets / sizeof sets[0])

#if !defined(__x86_64__) && !defined(_M_X64) && !defined(__aarch64__)
unsigned pe_cpu_detect(char *names, size_t n) { /* no SIMD kernels for this architecture */
    snprintf(names, n, "(none used)");
    return 0;
}
#endif

/* 1 if PYEFFORT_DISABLE_CPU_FEATURES (comma or space separated) names feature. */
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

/* The features the machine has, less those PYEFFORT_DISABLE_CPU_FEATURES drops (a feature
 * drops those that build on it: avx2 drops the AVX-512 ones too). */
static unsigned usable_features(char *names, size_t n) {
    unsigned f = pe_cpu_detect(names, n);
    if (disabled("avx2")) f &= ~(PE_CPU_AVX2 | PE_CPU_AVX512 | PE_CPU_AVX512VBMI2);
    if (disabled("avx512")) f &= ~(PE_CPU_AVX512 | PE_CPU_AVX512VBMI2);
    if (disabled("avx512vbmi2")) f &= ~PE_CPU_AVX512VBMI2;
    if (disabled("neon")) f &= ~PE_CPU_NEON;
    return f;
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static unsigned features;
static char feature_names[256], available[256];
static _Atomic(const pe_kernel_set *) active;
static atomic_int n_threads;

static int runs_here(const pe_kernel_set *s) { return (s->needs & ~features) == 0; }

static void init(void) {
    features = usable_features(feature_names, sizeof feature_names);
    for (int i = 0; i < N_SETS; i++) {
        if (!runs_here(&sets[i])) continue;
        if (!atomic_load(&active)) atomic_store(&active, &sets[i]);
        if (available[0]) strcat(available, ",");
        strcat(available, sets[i].name);
    }
    atomic_store(&n_threads, pe_default_threads());
}

const pe_kernel_set *pe_active_set(void) {
    pthread_once(&once, init);
    return atomic_load(&active);
}

const char *pe_kernel_name(void) { return pe_active_set()->name; }

const char *pe_cpu_features(void) {
    pthread_once(&once, init);
    return feature_names;
}

const char *pe_available_kernels(void) {
    pthread_once(&once, init);
    return available;
}

pe_status pe_use_kernel(const char *name) {
    pthread_once(&once, init);
    for (int i = 0; i < N_SETS; i++)
        if (strcmp(sets[i].name, name) == 0 && runs_here(&sets[i])) {
            atomic_store(&active, &sets[i]);
            return PE_OK;
        }
    return PE_ERR_ARG;
}

int pe_num_threads(void) {
    pthread_once(&once, init);
    return atomic_load_explicit(&n_threads, memory_order_relaxed);
}

void pe_set_num_threads(int n) {
    pthread_once(&once, init);
    atomic_store_explicit(&n_threads, n < 1 ? 1 : n, memory_order_relaxed);
}
