/* The walk shared by the permuted-copy kernels (permmul_*.c): dispatched inputs by class, in
 * batches of about 8 row streams, over blocks of groups. The including file defines, after
 * including this header, the ISA-specific
 *   static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n,
 *                                      const int T, const int full, int64_t g0, int64_t ng,
 *                                      float *acc);
 * acc[16 g + j] += x_u * w for the n items items[0, n) (T tiers each, pe_item_class; full = 1:
 * each dispatches all 4 T ranks of its tiers, so no rank needs masking; full = 2: each
 * dispatches a prefix of ranks, so only the last tier needs masking; full = 0: any rank set)
 * over groups [g0, g0 + ng),
 * items added in order; the prototype below lets the walk call it. The walk calls it with
 * constant T and full, and with a constant n for whole batches (registers, no spills). */
#ifndef PE_PERMWALK_H
#define PE_PERMWALK_H
#include <string.h>

#include "kernels.h"

#define PE_INLINE __attribute__((always_inline)) /* T constant: the tier loads unroll */
#define BLOCK 1024    /* groups per pass over the accumulators: 64 KiB (L2) */
#define MAX_BATCH 8
#define QUARTERS (PE_RANKS / PE_TIER)
#define PF_HEAD 4096  /* bytes of each row of the next batch prefetched */
#define PF_ALL_MAX (2 << 20)

/* Inputs per batch for T tiers: about 8 row streams at once (the prefetchers' reach). */
static const int batch_size[QUARTERS + 1] = {0, 8, 4, 3, 2};

static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int full, int64_t g0, int64_t ng, float *acc);

/* Group row bases of an item with T tiers: its records, and tier rows 1 .. T - 1 (4 fp16 per
 * group each). */
typedef struct {
    const uint8_t *rec;
    const uint16_t *tier[QUARTERS];
} item_rows;

static inline item_rows rows_of(const pe_packed *p, const pe_item *it, int T, int64_t g0) {
    const uint8_t *base = p->perm + p->perm_off[it->input];
    const uint16_t *t1 = (const uint16_t *)(base + p->n_groups * PE_PERM_REC);
    item_rows r = {base + g0 * PE_PERM_REC, {NULL}};
    for (int t = 1; t < T; t++) r.tier[t] = t1 + ((t - 1) * p->n_groups + g0) * PE_TIER;
    return r;
}

/* Prefetches into L2 the first limit bytes of each row of items[0, n) (T tiers) from group g0
 * on: a batch starts cold streams that the hardware prefetchers take a while to pick up. */
static void prefetch_rows(const pe_packed *p, const pe_item *items, int64_t n, int T, int64_t g0,
                          int64_t ng, int64_t limit) {
    int64_t rec_len = ng * PE_PERM_REC < limit ? ng * PE_PERM_REC : limit;
    int64_t tier_len = ng * 2 * PE_TIER < limit ? ng * 2 * PE_TIER : limit;
    for (int64_t u = 0; u < n; u++) {
        item_rows r = rows_of(p, items + u, T, g0);
        for (int64_t o = 0; o < rec_len; o += 64) __builtin_prefetch(r.rec + o, 0, 2);
        for (int t = 1; t < T; t++)
            for (int64_t o = 0; o < tier_len; o += 64)
                __builtin_prefetch((const char *)r.tier[t] + o, 0, 2);
    }
}

/* A batch of class (T, full): whole batches (n == bs) with n a constant. */
#define BATCH(T, FULL)                                                                      \
    do {                                                                                    \
        if (m == batch_size[T]) batch(p, items + s, batch_size[T], T, FULL, g0, ng, acc);  \
        else batch(p, items + s, m, T, FULL, g0, ng, acc);                                 \
    } while (0)

/* All items of class cl (T = cl / 2 + 1 tiers; cl even: whole tiers) in batches, in order. */
static void run_class(const pe_packed *p, const pe_item *items, int64_t n, int cl, int64_t g0,
                      int64_t ng, float *acc) {
    const int T = cl / 2 + 1, bs = batch_size[T];
    for (int64_t s = 0; s < n; s += bs) {
        int m = n - s < bs ? (int)(n - s) : bs;
        if (n - s > bs)
            prefetch_rows(p, items + s + bs, n - s - bs < bs ? n - s - bs : bs, T, g0, ng, PF_HEAD);
        /* constant T and full: the tier loads unroll; a monotone matrix's partial items are
         * prefixes */
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
}

/* Rows of a small job (up to PF_ALL_MAX bytes) all prefetched up front: cold, each batch of a
 * small matrix would otherwise wait on DRAM for its short rows. */
static void prefetch_all(const pe_packed *p, const pe_item *items,
                         const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                         int64_t g0, int64_t ng) {
    int64_t total = 0;
    for (int cl = 0; cl < PE_CLASSES; cl++)
        total += (end[cl] - begin[cl]) * (PE_PERM_REC + cl / 2 * 2 * PE_TIER) * ng;
    if (total > PF_ALL_MAX) return;
    for (int cl = 0; cl < PE_CLASSES; cl++)
        prefetch_rows(p, items + begin[cl], end[cl] - begin[cl], cl / 2 + 1, g0, ng, INT64_MAX);
}

/* This thread's accumulator block (a call: no TLS address lookup inside the walk). */
static __attribute__((noinline)) float *accumulators(void) {
    static _Thread_local float acc[BLOCK * PE_GROUP] __attribute__((aligned(64)));
    return acc;
}

/* The pe_tiermul_fn on the permuted copy: items by class, in order -> y[64 c0, min(64 c1,
 * n_out)), overwritten; chunks [c0, c1) (4 groups each) in blocks of BLOCK groups. */
static void perm_walk(const pe_packed *p, const pe_item *items, const int64_t begin[PE_CLASSES],
                      const int64_t end[PE_CLASSES], int64_t c0, int64_t c1, float *y) {
    float *acc = accumulators();
    int64_t g_end = 4 * c1 < p->n_groups ? 4 * c1 : p->n_groups;
    prefetch_all(p, items, begin, end, 4 * c0, g_end - 4 * c0);
    for (int64_t g0 = 4 * c0; g0 < g_end; g0 += BLOCK) {
        int64_t ng = g_end - g0 < BLOCK ? g_end - g0 : BLOCK;
        memset(acc, 0, sizeof(float) * PE_GROUP * (size_t)ng);
        for (int cl = 0; cl < PE_CLASSES; cl++)
            run_class(p, items + begin[cl], end[cl] - begin[cl], cl, g0, ng, acc);
        int64_t j0 = PE_GROUP * g0;
        int64_t m = p->n_out - j0 < PE_GROUP * ng ? p->n_out - j0 : PE_GROUP * ng;
        memcpy(y + j0, acc, sizeof(float) * (size_t)m);
    }
}
#endif
