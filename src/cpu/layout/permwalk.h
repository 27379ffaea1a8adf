/* The walk shared by the permuted-copy kernels (perm_scalar.c, arch/x86/perm_avx2.c,
 * arch/arm/perm_neon.c): dispatched inputs by class, in batches of about 8 row streams, over
 * blocks of groups. The including file defines, after
 * including this header, the ISA-specific
 *   static inline PE_INLINE void batch(const pe_item *items, int n, const int T,
 *                                      const int full, int64_t ng, float *acc,
 *                                      const batch_rows *cur, const batch_rows *nx);
 * acc[16 g + j] += x_u * w for the n items items[0, n) (T tiers each, pe_item_class; full = 1:
 * each dispatches all 4 T ranks of its tiers, so no rank needs masking; full = 2: each
 * dispatches a prefix of ranks, so only the last tier needs masking; full = 0: any rank set)
 * over the ng groups from cur's rows on (the walk made them, from the block's first group),
 * items added in order, calling prefetch_next(nx, g) at every fourth group g; the prototype
 * below lets the walk call it. The walk calls it with constant T and full, and with a constant
 * n for whole batches (registers, no spills). */
#ifndef PE_PERMWALK_H
#define PE_PERMWALK_H
#include <string.h>

#include "kernels.h"

#define PE_INLINE __attribute__((always_inline)) /* T constant: the tier loads unroll */
#define BLOCK 1024    /* groups per pass over the accumulators: 64 KiB (L2) */
#define MAX_BATCH 8
#define QUARTERS (PE_RANKS / PE_TIER)
#define PF_GROUPS 256 /* groups of the first batch's rows prefetched before it starts */

/* Inputs per batch for T tiers: about 8 row streams at once (the prefetchers' reach). */
static const int batch_size[QUARTERS + 1] = {0, 8, 4, 3, 2};

/* Group row bases of an item with T tiers: its records, and tier rows 1 .. T - 1 (4 fp16 per
 * group each). */
typedef struct {
    const uint8_t *rec;
    const uint16_t *tier[QUARTERS];
} item_rows;

/* The rows of a batch's items (n items, T tiers), made once by the walk: the running batch
 * reads its own, and prefetches the next batch's group by group: at its group g the next
 * batch's group g, one batch ahead, at the rate the rows are read (a burst of prefetches at a
 * batch's start stalls on the miss buffers). */
typedef struct {
    item_rows r[MAX_BATCH];
    int n, T;
} batch_rows;

/* Prefetches (into L2) the lines of nx's rows holding group g (g a multiple of 4: one record
 * line per 4 groups, one tier line per 8). */
static inline void prefetch_next(const batch_rows *nx, int64_t g) {
    for (int u = 0; u < nx->n; u++) __builtin_prefetch(nx->r[u].rec + g * PE_PERM_REC, 0, 2);
    if (g & 7) return;
    for (int u = 0; u < nx->n; u++)
        for (int t = 1; t < nx->T; t++) __builtin_prefetch(nx->r[u].tier[t] + g * PE_TIER, 0, 2);
}

static inline PE_INLINE void batch(const pe_item *items, int n, const int T, const int full,
                                   int64_t ng, float *acc, const batch_rows *cur,
                                   const batch_rows *nx);

static inline item_rows rows_of(const pe_packed *p, const pe_item *it, int T, int64_t g0) {
    const uint8_t *base = p->perm + p->perm_off[it->input];
    const uint16_t *t1 = (const uint16_t *)(base + p->n_groups * PE_PERM_REC);
    item_rows r = {base + g0 * PE_PERM_REC, {NULL}};
    for (int t = 1; t < T; t++) r.tier[t] = t1 + ((t - 1) * p->n_groups + g0) * PE_TIER;
    return r;
}

/* The rows of the m items from items on (T tiers) from group g0 on. */
static void rows_for(batch_rows *br, const pe_packed *p, const pe_item *items, int m, int T,
                     int64_t g0) {
    br->n = m;
    br->T = T;
    for (int u = 0; u < m; u++) br->r[u] = rows_of(p, items + u, T, g0);
}

/* A batch of class (T, FULL): whole batches (m == bs) with m a constant. */
#define BATCH(T, FULL)                                                                   \
    do {                                                                                 \
        if (m == batch_size[T]) batch(items, batch_size[T], T, FULL, ng, acc, cur, nx); \
        else batch(items, m, T, FULL, ng, acc, cur, nx);                                \
    } while (0)

/* The m items from items on, of class cl (T = cl / 2 + 1 tiers; cl even: whole tiers), with
 * T and full constant: the tier loads unroll; a monotone matrix's partial items are prefixes. */
static void run_batch(const pe_packed *p, const pe_item *items, int m, int cl, int64_t ng,
                      float *acc, const batch_rows *cur, const batch_rows *nx) {
    switch (cl + (cl & 1 && p->monotone ? 8 : 0)) {
    case 0: BATCH(1, 1); break;
    case 1: BATCH(1, 0); break;
    case 2: BATCH(2, 1); break;
    case 3: BATCH(2, 0); break;
    case 4: BATCH(3, 1); break;
    case 5: BATCH(3, 0); break;
    case 6: BATCH(4, 1); break;
    case 7: BATCH(4, 0); break;
    case 9: BATCH(1, 2); break;
    case 11: BATCH(2, 2); break;
    case 13: BATCH(3, 2); break;
    default: BATCH(4, 2); break;
    }
}

/* A batch: class cl, items [s, s + m) of the class (m = 0: past the last class). */
typedef struct {
    int cl;
    int64_t s;
    int m;
} batch_at;

/* The batch after the one at (cl, s) in walk order (classes in order, batches of batch_size
 * items in order), or m = 0 when none is left. */
static batch_at next_batch(const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES], int cl,
                           int64_t s) {
    for (; cl < PE_CLASSES; cl++, s = 0) {
        int64_t n = end[cl] - begin[cl], bs = batch_size[cl / 2 + 1];
        if (s < n) return (batch_at){cl, s, (int)(n - s < bs ? n - s : bs)};
    }
    return (batch_at){PE_CLASSES, 0, 0};
}

/* The rows of batch b (none when b.m = 0). */
static void rows_of_batch(batch_rows *br, const pe_packed *p, const pe_item *items,
                          const int64_t begin[PE_CLASSES], batch_at b, int64_t g0) {
    br->n = 0;
    if (b.m) rows_for(br, p, items + begin[b.cl] + b.s, b.m, b.cl / 2 + 1, g0);
}

/* All items, by class, in batches over groups [g0, g0 + ng): each batch prefetches the next
 * one's rows while it computes (across classes too); the first batch's first PF_GROUPS groups
 * are prefetched before it starts. */
static void run_block(const pe_packed *p, const pe_item *items, const int64_t begin[PE_CLASSES],
                      const int64_t end[PE_CLASSES], int64_t g0, int64_t ng, float *acc) {
    batch_rows rows[2], *cur = rows, *nx = rows + 1, *swap;
    batch_at b = next_batch(begin, end, 0, 0);
    rows_of_batch(cur, p, items, begin, b, g0);
    for (int64_t g = 0; g < ng && g < PF_GROUPS; g += 4) prefetch_next(cur, g);
    while (b.m) {
        batch_at nb = next_batch(begin, end, b.cl, b.s + b.m);
        rows_of_batch(nx, p, items, begin, nb, g0);
        run_batch(p, items + begin[b.cl] + b.s, b.m, b.cl, ng, acc, cur, nx);
        b = nb;
        swap = cur, cur = nx, nx = swap;
    }
}

/* This thread's accumulator block (a call: no TLS address lookup inside the walk). */
static __attribute__((noinline)) float *accumulators(void) {
    static _Thread_local float acc[BLOCK * PE_GROUP] __attribute__((aligned(64)));
    return acc;
}

/* The pe_items_fn walk on the permuted copy: items by class, in order -> y[64 c0, min(64 c1,
 * n_out)), overwritten; chunks [c0, c1) (4 groups each) in blocks of BLOCK groups. */
static void perm_walk(const pe_packed *p, const pe_item *items, const int64_t begin[PE_CLASSES],
                      const int64_t end[PE_CLASSES], int64_t c0, int64_t c1, float *y) {
    float *acc = accumulators();
    int64_t g_end = 4 * c1 < p->n_groups ? 4 * c1 : p->n_groups;
    for (int64_t g0 = 4 * c0; g0 < g_end; g0 += BLOCK) {
        int64_t ng = g_end - g0 < BLOCK ? g_end - g0 : BLOCK;
        memset(acc, 0, sizeof(float) * PE_GROUP * (size_t)ng);
        run_block(p, items, begin, end, g0, ng, acc);
        int64_t j0 = PE_GROUP * g0;
        int64_t m = p->n_out - j0 < PE_GROUP * ng ? p->n_out - j0 : PE_GROUP * ng;
        memcpy(y + j0, acc, sizeof(float) * (size_t)m);
    }
}
#endif
