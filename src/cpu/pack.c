/* The packed in-memory layout the SIMD kernels read (kernels.h, struct pe_packed): built once
 * per matrix from the canonical rows; the file layout is unchanged. */
#define _DEFAULT_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kernels.h"

/* 64-byte aligned; large blocks 2 MiB aligned and backed by huge pages where the kernel
 * allows (the kernels jump through them: 4 KiB pages cost a TLB miss per run). */
static void *alloc64(size_t n) {
    void *p = NULL;
    size_t align = n >= (4u << 20) ? (2u << 20) : 64;
    if (posix_memalign(&p, align, n ? n : 64)) return NULL;
#ifdef MADV_HUGEPAGE
    if (align > 64) madvise(p, n, MADV_HUGEPAGE);
#endif
    return p;
}

void pe_packed_free(pe_packed *p) {
    if (!p) return;
    free(p->values);
    free(p->pos);
    free(p->stats);
    free(p->slot0);
    free(p->n_loaded);
    free(p);
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
    int64_t pstride = (G + 1) / 2;
    p->n_in = n_in;
    p->n_out = b->n_out;
    p->n_groups = G;
    p->n_tiles = T;
    p->n_slots = S;
    p->values = alloc64(sizeof(uint16_t) * (size_t)(T * S * PE_TILE));
    p->pos = alloc64((size_t)(T * S * PE_TILE / 2));
    p->stats = alloc64(sizeof(float) * (size_t)(n_in * PE_RANKS));
    p->slot0 = malloc(sizeof(int32_t) * (size_t)n_in + 4);
    p->n_loaded = malloc((size_t)n_in + 1);
    if (!p->values || !p->pos || !p->stats || !p->slot0 || !p->n_loaded) {
        pe_packed_free(p);
        return PE_ERR_ALLOC;
    }
    pack_index(b, p);
    int64_t vs = T * PE_TILE, qs = T * (PE_TILE / 2);
    memset(p->values, 0, sizeof(uint16_t) * (size_t)(S * vs));
    memset(p->pos, 0, (size_t)(S * qs));
    for (int64_t r = 0; r < S; r++) {
        int64_t s = p->slot0[b->order[r]] + r / n_in;
        memcpy(p->values + s * vs, b->values + r * G, sizeof(uint16_t) * (size_t)G);
        memcpy(p->pos + s * qs, b->positions + r * pstride, (size_t)pstride);
    }
    *out = p;
    return PE_OK;
}
