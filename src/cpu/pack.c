/* The input-major index the SIMD kernels use (kernels.h, struct pe_packed): built once per
 * matrix; the canonical rows are read in place, or through the copy the kernel set in use
 * reads: tiered (tiers.c) or permuted (perm.c). */
#define _GNU_SOURCE /* madvise */
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

pe_status pe_pack(const pe_buckets *b, pe_packed **out) {
    *out = NULL;
    if (b->n_rows > 16 * b->n_in || b->n_rows >= INT32_MAX) return PE_ERR_ARG;
    pe_packed *p = calloc(1, sizeof *p);
    if (!p) return PE_ERR_ALLOC;
    int64_t G = b->n_groups, T = (G + PE_TILE - 1) / PE_TILE, S = b->n_rows, n_in = b->n_in;
    p->n_in = n_in;
    p->n_out = b->n_out;
    p->n_groups = G;
    p->n_tiles = T;
    p->n_slots = S;
    p->row = malloc(sizeof(int32_t) * (size_t)S + 4);
    p->stats = malloc(sizeof(float) * (size_t)(n_in * PE_RANKS));
    p->slot0 = malloc(sizeof(int32_t) * (size_t)n_in + 4);
    p->n_loaded = malloc((size_t)n_in + 1);
    if (!p->row || !p->stats || !p->slot0 || !p->n_loaded) {
        pe_packed_free(p);
        return PE_ERR_ALLOC;
    }
    pack_index(b, p);
    for (int64_t r = 0; r < S; r++) p->row[p->slot0[b->order[r]] + r / n_in] = (int32_t)r;
    p->n_chunks = (G + 3) / 4;
    p->monotone = stats_fall(p);
    const pe_cpu_kernels *kern = pe_active_kernels(); /* the copy the kernels in use read */
    pe_status st = kern->tiermul_f16   ? pe_build_tiers(b, p)
                   : kern->permmul_f16 ? pe_build_perm(b, p)
                                       : PE_OK;
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
