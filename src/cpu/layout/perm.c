/* The permuted copy of a matrix (kernels.h, "The permuted layout"), built once from the
 * canonical rows through the input-major index: the kernels that read it (perm_scalar.c, the
 * spec; arch/x86/perm_avx2.c, arch/arm/perm_neon.c) gather a group's dispatched ranks to their
 * positions with lane permutes instead of one routed add per weight. Same values; 2.5 bytes
 * per weight, as the canonical rows. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Bytes of input i's records and tier rows (n loaded ranks). */
static int64_t input_bytes(int64_t G, int n) {
    int tiers = (n + PE_TIER - 1) / PE_TIER;
    return n ? G * PE_PERM_REC + (tiers - 1) * G * 2 * PE_TIER : 0;
}

/* The records and tier rows of input i (n loaded ranks) -> dst; 0 if the input is damaged
 * (pe_weight_ok: a position repeats in a group or a value is not finite). */
static int fill_input(const pe_buckets *b, const pe_packed *p, int64_t i, int n, uint8_t *dst) {
    int64_t G = b->n_groups, pstride = (G + 1) / 2;
    const uint16_t *values = b->values; /* fp16: q8 matrices read the tiered copy */
    uint16_t *tier_rows = (uint16_t *)(dst + G * PE_PERM_REC);
    for (int64_t g = 0; g < G; g++) {
        uint8_t rank[PE_GROUP], *rec = dst + g * PE_PERM_REC;
        uint16_t vals[PE_RANKS] = {0}, used = 0;
        memset(rank, PE_RANKS - 1, sizeof rank); /* n < 16: rank 15 is never dispatched */
        for (int k = 0; k < n; k++) {
            int64_t r = p->row[p->slot0[i] + k];
            int pos = pe_position(b->positions + r * pstride, g);
            if (!pe_weight_ok(&used, pos, values[r * G + g])) return 0;
            rank[pos] = (uint8_t)k;
            vals[k] = values[r * G + g];
        }
        for (int q = 0; q < PE_GROUP / 2; q++) rec[q] = (uint8_t)(rank[q] | rank[q + 8] << 4);
        memcpy(rec + 8, vals, 2 * PE_TIER);
        for (int t = 1; t * PE_TIER < n; t++)
            memcpy(tier_rows + ((t - 1) * G + g) * PE_TIER, vals + t * PE_TIER, 2 * PE_TIER);
    }
    return 1;
}

typedef struct {
    const pe_buckets *b;
    pe_packed *p;
    atomic_int damaged; /* a position repeats or a value is not finite */
} fill_job;

/* Inputs of chunk c of n -> their records (threads fill disjoint inputs). */
static void fill_chunk(void *ctx, int c, int n) {
    fill_job *j = ctx;
    int64_t i0 = j->p->n_in * c / n, i1 = j->p->n_in * (c + 1) / n;
    for (int64_t i = i0; i < i1 && !atomic_load_explicit(&j->damaged, memory_order_relaxed); i++)
        if (j->p->n_loaded[i] &&
            !fill_input(j->b, j->p, i, j->p->n_loaded[i], j->p->perm + j->p->perm_off[i]))
            atomic_store(&j->damaged, 1);
}

pe_status pe_build_perm(const pe_buckets *b, pe_packed *p, int n_threads) {
    int64_t total = 0;
    p->perm_off = malloc(sizeof(int64_t) * (size_t)p->n_in + 8);
    if (!p->perm_off) return PE_ERR_ALLOC;
    for (int64_t i = 0; i < p->n_in; i++) {
        p->perm_off[i] = total;
        total += input_bytes(b->n_groups, p->n_loaded[i]);
    }
    p->perm = pe_alloc_copy((size_t)total + 64);
    p->perm_bytes = total;
    if (!p->perm) return PE_ERR_ALLOC; /* pe_packed_free frees the rest */
    fill_job job = {.b = b, .p = p};
    atomic_init(&job.damaged, 0);
    pe_status st = pe_parallel(fill_chunk, &job, 4 * n_threads, n_threads);
    return st != PE_OK ? st : atomic_load(&job.damaged) ? PE_ERR_FORMAT : PE_OK;
}
