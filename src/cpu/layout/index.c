/* The input-major index (kernels.h, struct pe_packed), built once per matrix for the kernel set
 * in use, with the in-memory copy that set's kernel reads: tiered (tiers.c), permuted (perm.c)
 * or none (the canonical rows in place, checked here). */
#define _GNU_SOURCE /* madvise */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kernels.h"

void *pe_alloc_copy(size_t size) {
    size_t align = size >= (4u << 20) ? (2u << 20) : 64, padded = (size + align - 1) / align * align;
    void *mem = NULL;
    if (posix_memalign(&mem, align, padded)) return NULL;
#ifdef MADV_HUGEPAGE
    if (align > 64) madvise(mem, padded, MADV_HUGEPAGE);
#endif
    return mem;
}

void pe_packed_free(pe_packed *p) {
    if (!p) return;
    pe_pool_unwarm(p);
    free(p->row);
    free(p->stats);
    free(p->slot0);
    free(p->n_loaded);
    free(p->scale_row);
    free(p->tiers);
    free(p->tier_off);
    free(p->perm);
    free(p->perm_off);
    free(p);
}

void pe_warm_packed(const pe_packed *const *ps, int n) {
    pe_warm_range r[PE_WARM_RANGES];
    int k = 0;
    if (pe_num_threads() < 2) return;
    for (int j = 0; j < n && k < PE_WARM_RANGES; j++) { /* what the cutoff searches read */
        size_t len = sizeof(float) * (size_t)(ps[j]->n_in * PE_RANKS);
        r[k++] = (pe_warm_range){ps[j]->stats, ps[j], len};
    }
    for (int j = 0; j < n && k < PE_WARM_RANGES; j++) /* then what the kernels read */
        if (ps[j]->perm) r[k++] = (pe_warm_range){ps[j]->perm, ps[j], (size_t)ps[j]->perm_bytes};
    pe_pool_warm(r, k);
}

/* 1 if every input's loaded statistics never rise with rank: a cutoff then dispatches a
 * prefix of ranks per input (true for every matrix pe_build_f16 makes; a file could lie). */
static int stats_fall(const pe_packed *p) {
    for (int64_t i = 0; i < p->n_in; i++) {
        const float *s = p->stats + i * PE_RANKS;
        for (int k = 1; k < p->n_loaded[i]; k++)
            if (!(s[k] <= s[k - 1])) return 0;
    }
    return 1;
}

/* Slot bookkeeping: n_loaded, slot0, stats, m, unloaded. */
static void pack_index(const pe_buckets *b, pe_packed *p) {
    int64_t n_in = b->n_in, tail = b->n_out % PE_GROUP, loaded = 0;
    for (int k = 0; k < PE_RANKS; k++) p->m[k] = b->n_groups - (tail && k >= tail ? 1 : 0);
    memset(p->n_loaded, 0, (size_t)n_in);
    memset(p->stats, 0, sizeof(float) * (size_t)(n_in * PE_RANKS));
    for (int64_t r = 0; r < b->n_rows; r++) {
        int32_t i = b->order[r];
        int64_t k = r / n_in;
        p->stats[i * PE_RANKS + k] = b->stats[r];
        p->n_loaded[i]++;
        loaded += p->m[k];
    }
    int64_t s = 0, all = 0;
    for (int64_t i = 0; i < n_in; i++) {
        p->slot0[i] = (int32_t)s;
        s += p->n_loaded[i];
    }
    for (int k = 0; k < PE_RANKS; k++) all += p->m[k] * n_in;
    p->unloaded = all - loaded;
}

int pe_scales_ok(const pe_buckets *b, const pe_packed *p, int64_t i) {
    int ok = 1;
    for (int t = 0; p->q8 && t < PE_RANKS / PE_TIER && p->scale_row[4 * i + t] >= 0; t++) {
        const uint16_t *s = b->scales + p->scale_row[4 * i + t] * p->n_chunks;
        for (int64_t c = 0; c < p->n_chunks; c++) ok &= pe_scale_ok(s[c]);
    }
    return ok;
}

/* q8: the row of b->scales of each loaded tier of each input (-1 past the loaded ones). */
static void pack_scale_rows(const pe_packed *p) {
    for (int64_t i = 0; i < p->n_in; i++)
        for (int t = 0; t < PE_RANKS / PE_TIER; t++) {
            int k = PE_TIER * t; /* row k n_in + j of rank k -> scale row t n_in + j */
            p->scale_row[4 * i + t] =
                k < p->n_loaded[i] ? p->row[p->slot0[i] + k] - (int32_t)((k - t) * p->n_in) : -1;
        }
}

/* The canonical layout copies nothing, so it is checked on its own: the inputs of chunk c of
 * n against pe_weight_ok, the rule the copies apply as they are built. */
typedef struct {
    const pe_buckets *b;
    const pe_packed *p;
    atomic_int damaged, failed;
} check_job;

static void check_chunk(void *ctx, int c, int n) {
    check_job *j = ctx;
    const pe_buckets *b = j->b;
    const pe_packed *p = j->p;
    int64_t i0 = p->n_in * c / n, i1 = p->n_in * (c + 1) / n, G = b->n_groups;
    int64_t pstride = (G + 1) / 2;
    uint16_t *used = malloc(sizeof(uint16_t) * (size_t)G + 2);
    if (!used) {
        atomic_store(&j->failed, 1);
        return;
    }
    int ok = 1;
    for (int64_t i = i0; i < i1 && ok; i++) {
        memset(used, 0, sizeof(uint16_t) * (size_t)G);
        for (int k = 0; k < p->n_loaded[i]; k++) {
            int64_t r = p->row[p->slot0[i] + k];
            const uint8_t *q = b->positions + r * pstride;
            if (p->q8) {
                const int8_t *v = (const int8_t *)b->values + r * G;
                for (int64_t g = 0; g < G; g++)
                    ok &= pe_weight_ok_q8(used + g, pe_position(q, g), v[g]);
            } else {
                const uint16_t *v = (const uint16_t *)b->values + r * G;
                for (int64_t g = 0; g < G; g++)
                    ok &= pe_weight_ok(used + g, pe_position(q, g), v[g]);
            }
        }
        ok &= pe_scales_ok(b, p, i);
    }
    if (!ok) atomic_store(&j->damaged, 1);
    free(used);
}

static pe_status check_canonical(const pe_buckets *b, const pe_packed *p, int nt) {
    check_job job = {.b = b, .p = p};
    atomic_init(&job.damaged, 0);
    atomic_init(&job.failed, 0);
    pe_status st = pe_parallel(check_chunk, &job, 4 * nt, nt);
    if (st != PE_OK) return st;
    if (atomic_load(&job.failed)) return PE_ERR_ALLOC;
    return atomic_load(&job.damaged) ? PE_ERR_FORMAT : PE_OK;
}

/* The layout p's kernel set reads, built (the canonical one: checked). */
static pe_status build_layout(const pe_buckets *b, pe_packed *p, int nt) {
    switch (p->q8 ? p->set->layout_q8 : p->set->layout) {
    case PE_TIERED: return pe_build_tiers(b, p, nt);
    case PE_PERMUTED: return pe_build_perm(b, p, nt);
    default: return check_canonical(b, p, nt);
    }
}

pe_status pe_pack(const pe_buckets *b, pe_packed **out) {
    *out = NULL;
    if (b->n_rows > 16 * b->n_in || b->n_rows >= INT32_MAX ||
        b->n_groups != (b->n_out + PE_GROUP - 1) / PE_GROUP ||
        (b->kind == PE_VALUES_Q8 && !b->scales && b->n_rows > 0))
        return PE_ERR_ARG;
    pe_packed *p = calloc(1, sizeof *p);
    if (!p) return PE_ERR_ALLOC;
    int64_t G = b->n_groups, S = b->n_rows, n_in = b->n_in;
    p->set = pe_active_set();
    p->q8 = b->kind == PE_VALUES_Q8;
    p->bucketmul = p->q8 ? p->set->bucketmul_q8 : p->set->bucketmul;
    p->n_in = n_in;
    p->n_out = b->n_out;
    p->n_groups = G;
    p->n_chunks = (G + 3) / 4;
    p->n_slots = S;
    p->row = malloc(sizeof(int32_t) * (size_t)S + 4);
    p->stats = malloc(sizeof(float) * (size_t)(n_in * PE_RANKS));
    p->slot0 = malloc(sizeof(int32_t) * (size_t)n_in + 4);
    p->n_loaded = malloc((size_t)n_in + 1);
    if (p->q8) p->scale_row = malloc(sizeof(int32_t) * (size_t)(4 * n_in) + 4);
    if (!p->row || !p->stats || !p->slot0 || !p->n_loaded || (p->q8 && !p->scale_row)) {
        pe_packed_free(p);
        return PE_ERR_ALLOC;
    }
    pack_index(b, p);
    for (int64_t r = 0; r < S; r++) p->row[p->slot0[b->order[r]] + r / n_in] = (int32_t)r;
    p->monotone = stats_fall(p);
    if (p->q8) pack_scale_rows(p);
    pe_status st = build_layout(b, p, pe_num_threads());
    if (st != PE_OK) {
        pe_packed_free(p);
        return st;
    }
    *out = p;
    return PE_OK;
}

const char *pe_packed_copy(const pe_packed *p) {
    return p->tiers ? "tiered" : p->perm ? "permuted" : "canonical";
}
