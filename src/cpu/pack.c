/* The packed in-memory layout the SIMD kernels read (kernels.h, struct pe_packed): built once
 * per matrix from the canonical rows; the file layout is unchanged. */
#define _POSIX_C_SOURCE 200112L
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static void *alloc64(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n ? n : 64) ? NULL : p;
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
    for (int64_t r = 0; r < S; r++) {
        int64_t s = p->slot0[b->order[r]] + r / n_in;
        const uint16_t *v = b->values + r * G;
        const uint8_t *q = b->positions + r * pstride;
        for (int64_t t = 0; t < T; t++) {
            uint16_t *dv = p->values + (t * S + s) * PE_TILE;
            uint8_t *dq = p->pos + (t * S + s) * (PE_TILE / 2);
            int64_t ng = G - t * PE_TILE < PE_TILE ? G - t * PE_TILE : PE_TILE;
            int64_t nb = pstride - t * 8 < 8 ? pstride - t * 8 : 8;
            memset(dv, 0, sizeof(uint16_t) * PE_TILE);
            memset(dq, 0, PE_TILE / 2);
            memcpy(dv, v + t * PE_TILE, sizeof(uint16_t) * (size_t)ng);
            memcpy(dq, q + t * 8, (size_t)nb);
        }
    }
    *out = p;
    return PE_OK;
}
