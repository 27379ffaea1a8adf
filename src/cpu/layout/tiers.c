/* The tiered copy of a matrix (kernels.h, "The tiered layout"), built once from the canonical
 * rows through the input-major index, for fp16 or int8 (q8) values: the kernels that read it
 * (tiers_scalar.c and tiers_q8_scalar.c, the specs; arch/x86/tiers_avx512vbmi2.c,
 * tiers_q8_avx512vbmi2.c, tiers_q8_avx2.c, arch/arm/tiers_q8_neon.c) place 4 ranks of a group
 * with one expand or byte shuffle instead of one masked add per weight. Same values, same bytes
 * per rank (q8: the chunk's scale in each record, as the canonical scales). */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Per group of one input: each position's value (fp16 bits, or the int8's byte) and rank, the
 * positions of each tier. */
typedef struct {
    uint16_t vals[PE_GROUP], mask[PE_RANKS / PE_TIER], used;
    uint8_t rank[PE_GROUP];
} group_tiers;

/* The loaded ranks (n) of input i, row by row (each canonical row read in order) -> gt (G).
 * Returns 0 if the input is damaged (pe_weight_ok, pe_weight_ok_q8: a position repeats in a
 * group, a value is not finite or -128; pe_scales_ok: a scale is not finite or negative). */
static int gather_input(const pe_buckets *b, const pe_packed *p, int64_t i, int n,
                        group_tiers *gt) {
    int ok = pe_scales_ok(b, p, i);
    int64_t G = b->n_groups, pstride = (G + 1) / 2;
    memset(gt, 0, sizeof(group_tiers) * (size_t)G);
    for (int k = 0; k < n; k++) {
        int64_t r = p->row[p->slot0[i] + k];
        const uint16_t *v = (const uint16_t *)b->values + r * G;
        const int8_t *v8 = (const int8_t *)b->values + r * G;
        const uint8_t *q = b->positions + r * pstride;
        int t = k / PE_TIER;
        for (int64_t g = 0; g < G; g++) {
            int pos = pe_position(q, g);
            ok &= p->q8 ? pe_weight_ok_q8(&gt[g].used, pos, v8[g])
                        : pe_weight_ok(&gt[g].used, pos, v[g]);
            gt[g].mask[t] |= (uint16_t)(1u << pos);
            gt[g].vals[pos] = p->q8 ? (uint8_t)v8[g] : v[g];
            gt[g].rank[pos] = (uint8_t)k;
        }
    }
    return ok;
}

/* The 4 values v of a tier's group (fp16 bits or int8 bytes) -> the record rec's slots of
 * group g % 4; q8: the tier's scale of the chunk after the values (once per chunk). */
static void put_values(const pe_buckets *b, const pe_packed *p, int64_t i, int t, int64_t g,
                       const uint16_t v[PE_TIER], uint8_t *rec) {
    if (!p->q8) {
        memcpy(rec + 8 + 2 * PE_TIER * (g % 4), v, 2 * PE_TIER);
        return;
    }
    for (int s = 0; s < PE_TIER; s++) rec[8 + PE_TIER * (g % 4) + s] = (uint8_t)v[s];
    if (g % 4 == 0) memcpy(rec + 24, b->scales + p->scale_row[4 * i + t] * p->n_chunks + g / 4, 2);
}

/* The tier rows of input i (n loaded ranks, ceil(n / 4) rows of row bytes) -> dst; 0 if its
 * positions repeat (gather_input). */
static int fill_input(const pe_buckets *b, const pe_packed *p, int64_t i, int n, int64_t row,
                       group_tiers *gt, uint8_t *dst) {
    int64_t C = p->n_chunks, G = b->n_groups, rec_bytes = p->q8 ? PE_TIER_REC_Q8 : PE_TIER_REC;
    int n_tiers = (n + PE_TIER - 1) / PE_TIER;
    if (!gather_input(b, p, i, n, gt)) return 0;
    for (int64_t g = 0; g < 4 * C; g++) {
        static const group_tiers none; /* a padding group: no ranks */
        const group_tiers *q = g < G ? gt + g : &none;
        uint16_t used = q->used;
        for (int t = 0; t < n_tiers; t++) {
            uint8_t *tier = dst + t * row, *rec = tier + (g / 4) * rec_bytes;
            /* a partly loaded tier (or a padding group) still routes 4 slots: zeros at free
             * positions, never where another tier of this input has a value */
            uint16_t m = q->mask[t];
            for (int pos = 0; pos < PE_GROUP && pe_popcount(m) < PE_TIER; pos++)
                if (!((used | m) >> pos & 1)) m |= (uint16_t)(1u << pos);
            used |= m;
            memcpy(rec + 2 * (g % 4), &m, 2);
            uint16_t v[PE_TIER];
            uint8_t codes = 0; /* 2 bits per slot: its rank inside the tier; 3 at padding */
            for (int pos = 0, s = 0; pos < PE_GROUP; pos++) {
                if (!(m >> pos & 1)) continue;
                int real = q->mask[t] >> pos & 1;
                v[s] = real ? q->vals[pos] : 0;
                codes |= (uint8_t)((real ? q->rank[pos] % PE_TIER : 3) << (2 * s));
                s++;
            }
            put_values(b, p, i, t, g, v, rec);
            tier[C * rec_bytes + g] = codes;
        }
    }
    return 1;
}

typedef struct {
    const pe_buckets *b;
    pe_packed *p;
    int64_t row;
    atomic_int failed;  /* a worker could not get its scratch */
    atomic_int damaged; /* a position repeats or a value is not finite */
} fill_job;

/* Inputs of chunk c of n -> their tier rows (threads fill disjoint inputs). */
static void fill_chunk(void *ctx, int c, int n) {
    fill_job *j = ctx;
    int64_t i0 = j->p->n_in * c / n, i1 = j->p->n_in * (c + 1) / n;
    group_tiers *gt = malloc(sizeof(group_tiers) * (size_t)j->b->n_groups + 1);
    if (!gt) {
        atomic_store(&j->failed, 1);
        return;
    }
    for (int64_t i = i0; i < i1 && !atomic_load_explicit(&j->damaged, memory_order_relaxed); i++)
        if (!fill_input(j->b, j->p, i, j->p->n_loaded[i], j->row, gt,
                        j->p->tiers + j->p->tier_off[i]))
            atomic_store(&j->damaged, 1);
    free(gt);
}

pe_status pe_build_tiers(const pe_buckets *b, pe_packed *p, int n_threads) {
    int64_t row = p->n_chunks * (p->q8 ? PE_TIER_CHUNK_Q8 : PE_TIER_CHUNK), total = 0;
    p->tier_off = malloc(sizeof(int64_t) * (size_t)p->n_in + 8);
    if (!p->tier_off) return PE_ERR_ALLOC;
    for (int64_t i = 0; i < p->n_in; i++) {
        p->tier_off[i] = total;
        total += (p->n_loaded[i] + PE_TIER - 1) / PE_TIER * row;
    }
    p->tiers = pe_alloc_copy((size_t)(total + 64));
    if (!p->tiers) return PE_ERR_ALLOC; /* pe_packed_free frees the rest */
    fill_job job = {.b = b, .p = p, .row = row};
    atomic_init(&job.failed, 0);
    atomic_init(&job.damaged, 0);
    pe_status st = pe_parallel(fill_chunk, &job, 4 * n_threads, n_threads);
    if (st != PE_OK) return st;
    if (atomic_load(&job.failed)) return PE_ERR_ALLOC;
    return atomic_load(&job.damaged) ? PE_ERR_FORMAT : PE_OK;
}
