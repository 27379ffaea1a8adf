/* The walk shared by the tiered-copy kernels (tiers_scalar.c, tiers_q8_scalar.c and their SIMD
 * kernels in arch/): dispatched inputs by class, in batches of about 8 row streams, over blocks
 * of chunks. The including file defines TIER_REC (the record's bytes: PE_TIER_REC for fp16
 * values, PE_TIER_REC_Q8 for int8) before including this header, and after it the ISA-specific
 *   static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n,
 *                                      const int T, const int PARTIAL, int64_t cb, int64_t nc,
 *                                      float *acc);
 * acc[64 c + j] += x_u * w for the n inputs items[0, n) (T tiers each, all whole unless
 * PARTIAL, pe_item_class) over chunks [cb, cb + nc), inputs added in item order; the
 * prototype below lets the walk call it. */
#ifndef PE_TIERWALK_H
#define PE_TIERWALK_H
#include <string.h>

#include "kernels.h"

#ifndef TIER_REC
#error "define TIER_REC (PE_TIER_REC or PE_TIER_REC_Q8) before including tierwalk.h"
#endif
#define TIER_ROW(p) ((p)->n_chunks * (TIER_REC + 4)) /* bytes of a tier row: records, codes */

#define BLOCK 256 /* chunks per pass over the accumulators: 256 x 64 floats = 64 KiB (L2) */
#define MAX_BATCH 8
#define PE_INLINE __attribute__((always_inline)) /* T, PARTIAL constant: loops unroll */
#define PF_HEAD 4096

/* Inputs per batch for T tiers: about 8 row streams at once (the prefetchers' reach). */
static const int batch_size[PE_RANKS / PE_TIER + 1] = {0, 8, 4, 3, 2};

static inline PE_INLINE void batch(const pe_packed *p, const pe_item *items, int n, const int T,
                                   const int PARTIAL, int64_t cb, int64_t nc, float *acc);

/* The slots (16 bits, 4 groups x 4) whose rank code (2 bits each, codes) is in the 4-bit rank
 * set r (portable: the even bits of the match word compressed). */
static inline uint32_t pe_kept_slots(uint32_t codes, uint32_t r) {
    uint32_t hi = (codes >> 1) & 0x55555555u, lo = codes & 0x55555555u, nh = ~hi, nl = ~lo;
    uint32_t v = (((r & 1) ? nh & nl : 0) | ((r & 2) ? nh & lo : 0) | ((r & 4) ? hi & nl : 0) |
                  ((r & 8) ? hi & lo : 0)) & 0x55555555u;
    v = (v | v >> 1) & 0x33333333u;
    v = (v | v >> 2) & 0x0F0F0F0Fu;
    v = (v | v >> 4) & 0x00FF00FFu;
    return (v | v >> 8) & 0xFFFFu;
}

/* Prefetches into L2 the first PF_HEAD bytes of each tier row of the next batch: a batch
 * starts cold streams that the hardware prefetchers take a while to pick up. */
static inline void prefetch_heads(const pe_packed *p, const pe_item *items, int64_t n, int T,
                                  int64_t cb, int64_t nc) {
    int64_t row = TIER_ROW(p), len = nc * TIER_REC;
    if (len > PF_HEAD) len = PF_HEAD;
    for (int64_t u = 0; u < n; u++) {
        const char *r0 = (const char *)(p->tiers + p->tier_off[items[u].input] + cb * TIER_REC);
        for (int t = 0; t < T; t++)
            for (int64_t o = 0; o < len; o += 64) __builtin_prefetch(r0 + t * row + o, 0, 2);
    }
}

/* All items of class cl (T = cl / 2 + 1 tiers, partial = cl & 1) in batches. */
static void run_class(const pe_packed *p, const pe_item *items, int64_t n, int cl, int64_t cb,
                      int64_t nc, float *acc) {
    const int T = cl / 2 + 1, bs = batch_size[T];
    for (int64_t s = 0; s < n; s += bs) {
        int m = n - s < bs ? (int)(n - s) : bs;
        prefetch_heads(p, items + s + bs, n - s - bs < bs ? n - s - bs : bs, T, cb, nc);
        switch (cl) { /* constant T and PARTIAL: the tier loop unrolls */
        case 0: batch(p, items + s, m, 1, 0, cb, nc, acc); break;
        case 1: batch(p, items + s, m, 1, 1, cb, nc, acc); break;
        case 2: batch(p, items + s, m, 2, 0, cb, nc, acc); break;
        case 3: batch(p, items + s, m, 2, 1, cb, nc, acc); break;
        case 4: batch(p, items + s, m, 3, 0, cb, nc, acc); break;
        case 5: batch(p, items + s, m, 3, 1, cb, nc, acc); break;
        case 6: batch(p, items + s, m, 4, 0, cb, nc, acc); break;
        default: batch(p, items + s, m, 4, 1, cb, nc, acc); break;
        }
    }
}

/* Small jobs (up to PF_ALL_MAX bytes of rows): prefetches every row segment the walk will
 * read, all at once. The walk visits rows class by class, scattered through memory; cold,
 * each batch of a small matrix would otherwise wait on DRAM for its short rows. */
#define PF_ALL_MAX (2 << 20)
static void prefetch_all(const pe_packed *p, const pe_item *items,
                         const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                         int64_t c0, int64_t c1) {
    int64_t row = TIER_ROW(p), len = (c1 - c0) * TIER_REC, total = 0;
    for (int cl = 0; cl < PE_CLASSES; cl++) total += (end[cl] - begin[cl]) * (cl / 2 + 1) * len;
    if (total > PF_ALL_MAX) return;
    for (int cl = 0; cl < PE_CLASSES; cl++)
        for (int64_t i = begin[cl]; i < end[cl]; i++) {
            const char *r0 = (const char *)(p->tiers + p->tier_off[items[i].input]);
            for (int t = 0; t <= cl / 2; t++)
                for (int64_t o = 0; o < len; o += 64)
                    __builtin_prefetch(r0 + t * row + c0 * TIER_REC + o, 0, 2);
        }
}

/* This thread's accumulator block (a call, so that the walk gets a plain pointer: a TLS
 * address propagated into it costs a __tls_get_addr call per batch in a shared library). */
static __attribute__((noinline)) float *accumulators(void) {
    static _Thread_local float acc[BLOCK * 64] __attribute__((aligned(64)));
    return acc;
}

/* The pe_items_fn walk: blocks of chunks, accumulators zeroed, classes walked, copied out. */
static void tier_walk(const pe_packed *p, const pe_item *items, const int64_t begin[PE_CLASSES],
                      const int64_t end[PE_CLASSES], int64_t c0, int64_t c1, float *y) {
    float *acc = accumulators();
    prefetch_all(p, items, begin, end, c0, c1);
    for (int64_t cb = c0; cb < c1; cb += BLOCK) {
        int64_t nc = c1 - cb < BLOCK ? c1 - cb : BLOCK;
        memset(acc, 0, sizeof(float) * 64 * (size_t)nc);
        for (int cl = 0; cl < PE_CLASSES; cl++)
            run_class(p, items + begin[cl], end[cl] - begin[cl], cl, cb, nc, acc);
        int64_t j0 = 64 * cb, m = p->n_out - j0 < 64 * nc ? p->n_out - j0 : 64 * nc;
        memcpy(y + j0, acc, sizeof(float) * (size_t)m);
    }
}
#endif
