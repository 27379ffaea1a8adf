/* The CPU kernel table: one implementation per ISA, chosen once at first use (dispatch.c). */
#ifndef PE_KERNELS_H
#define PE_KERNELS_H
#include <string.h>

#include "pyeffort.h"

#define PE_TILE 16 /* groups per tile: 16 groups = 256 outputs */

/* One dispatched bucket row and the input value it is multiplied by (canonical layout). */
typedef struct {
    int64_t row;
    float x;
} pe_task;

/* A run of dispatched slots of one input (pe_packed): slots [slot, slot + n), value x. */
typedef struct {
    int32_t slot, n;
    float x;
} pe_run;

/* The in-memory index the SIMD kernels use (pack.c): slots are the canonical rows renumbered
 * input-major, so an input's dispatched ranks are one run of slots. Slot s = slot0[i] + k is
 * rank k of input i (k < n_loaded[i]) and canonical row row[s]; the rows are read in place. */
struct pe_packed {
    int32_t *row;       /* (n_slots,) canonical row of each slot                          */
    float *stats;       /* (n_in, 16) statistic of rank k of input i, 0 if not loaded     */
    int32_t *slot0;     /* (n_in,) first slot of input i                                  */
    uint8_t *n_loaded;  /* (n_in,) loaded ranks of input i (a prefix of its ranks)        */
    int64_t n_in, n_out, n_groups, n_tiles, n_slots;
    int64_t m[PE_RANKS];  /* real multiplications of a row of rank k                     */
    int64_t unloaded;     /* sum of m over the slots that are not loaded                 */
    int monotone;         /* every input's stats fall with rank: its keys do, for any x   */
    /* The tiered copy (tiers.c), built when a kernel set that reads it is available and
     * every input's statistics fall with rank (so a token dispatches a prefix of ranks);
     * NULL otherwise. */
    uint8_t *tiers;       /* tier rows, PE_TIER_CHUNK bytes per chunk                     */
    int64_t *tier_off;    /* (n_in,) byte offset of input i's first tier row              */
    int64_t n_chunks;     /* chunks of 4 groups (64 outputs), ceil(G / 4)                 */
    /* The permuted copy (perm.c), built instead where the kernel set in use reads it; NULL
     * otherwise. */
    uint8_t *perm;        /* rank maps and rank-ordered values, per input                 */
    int64_t *perm_off;    /* (n_in,) byte offset of input i's records                     */
    int64_t perm_bytes;   /* the copy's size                                              */
};

/* The tiered layout. Tier t of input i holds ranks 4t..4t+3 of every group in position order:
 * a tier row is n_chunks records of 40 bytes (chunk c = groups 4c..4c+3: a u64 of four 16-bit
 * masks, the positions of the tier's 4 ranks in each group, then 16 fp16 values, 4 per group
 * in position order), then n_chunks u32 rank codes (2 bits per value, in value order: its rank
 * inside the tier, 0..3), read only for a token that dispatches part of a tier. Tiers of one
 * input cover disjoint positions, so they merge into one vector per group before the multiply.
 * Unloaded ranks of a partly loaded tier are zero values at free positions, code 3. */
#define PE_TIER 4
#define PE_TIER_CHUNK 44 /* bytes per chunk per tier row: 40 record + 4 rank codes */
#define PE_TIER_REC 40

/* The permuted layout, for kernels with a lane permute or table lookup but no expand (AVX2,
 * NEON). Per input i, at
 * perm_off[i]: n_groups records of 16 bytes (the group's rank map, 8 bytes: byte b holds the
 * rank of position b in its low nibble and of position b + 8 in its high nibble; then the fp16
 * values of ranks 0..3 in rank order), then one row per further loaded tier t = 1, 2, 3
 * (n_groups x 4 fp16: ranks 4t..4t+3). A kernel multiplies a group's rank-ordered values by x
 * where the item dispatches the rank and by 0 elsewhere, then gathers them to their positions
 * through the rank map (a lane permute): no per-weight routing, any rank set. A position whose
 * rank is not loaded names an unloaded rank (never dispatched); unloaded values are 0. */
#define PE_PERM_REC 16

/* One dispatched input: its ranks in mask (bit k: rank k; not empty), multiplied by x. A
 * prefix of ranks when the input's statistics fall with rank (always, for matrices pe_build
 * makes, but for the padding ranks of a last group narrower than 16), any set otherwise. */
typedef struct {
    int32_t input;
    uint32_t mask;
    float x;
} pe_item;
/* A spin-wait's pause (threads.c, and waits inside a job). */
static inline void pe_cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Items are grouped by class 2 (T - 1) + partial: T the tiers up to the last one touched,
 * partial if a tier below T is not whole (then each tier keeps the ranks its 4 bits name). */
#define PE_CLASSES 8
static inline int pe_item_class(uint32_t mask) {
    int top = 31 - __builtin_clz(mask), t = top / PE_TIER + 1;
    return 2 * (t - 1) + (mask != (1u << (PE_TIER * t)) - 1);
}

/* Kernels walk the runs in batches of about PE_BATCH slots: a batch's row segments are first
 * copied in row order into a contiguous buffer (streaming reads), then, tile by tile, the tile's
 * accumulators stay in registers or L1 while the staged rows pass. */
#define PE_BATCH 64
#define PE_CHUNK 64 /* tiles per pass: 64 KiB of thread-local accumulators */

/* The end of the batch of runs starting at r0: at most PE_BATCH slots, at least one run. */
static inline int64_t pe_batch_end(const pe_run *runs, int64_t n_runs, int64_t r0) {
    int64_t r1 = r0 + 1, n = runs[r0].n;
    while (r1 < n_runs && n + runs[r1].n <= PE_BATCH) n += runs[r1++].n;
    return r1;
}

/* Bits set in a 32-bit mask (no popcnt instruction in the portable files: libgcc's is a call). */
static inline int pe_popcount(uint32_t v) {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (int)((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

/* memcpy for short, variable sizes: whole 64-byte blocks inline, then the rest. */
static inline void pe_copy(void *dst, const void *src, int64_t n) {
    char *d = dst;
    const char *s = src;
    for (; n >= 64; n -= 64, d += 64, s += 64) __builtin_memcpy(d, s, 64);
    for (; n >= 8; n -= 8, d += 8, s += 8) __builtin_memcpy(d, s, 8);
    if (n) memcpy(d, s, (size_t)n);
}

/* Copies the segments of tiles [c0, c1) (groups 16 c0 .. 16 c1, zero past G) of the rows of
 * the slots of runs[r0, r1) into vals, pos (16 (c1 - c0) values, 8 (c1 - c0) position bytes per
 * slot) and their x into xs; returns the slot count. Reads every row segment in order. */
static inline int64_t pe_stage(const pe_packed *pk, const pe_buckets *b, const pe_run *runs,
                               int64_t r0, int64_t r1, int64_t c0, int64_t c1, uint16_t *vals,
                               uint8_t *pos, float *xs) {
    int64_t G = b->n_groups, pstride = (G + 1) / 2, n = 0;
    int64_t nv = (c1 - c0) * PE_TILE, nq = (c1 - c0) * (PE_TILE / 2);
    int64_t gv = (G < c1 * PE_TILE ? G : c1 * PE_TILE) - c0 * PE_TILE;
    int64_t gq = (pstride < c1 * 8 ? pstride : c1 * 8) - c0 * 8;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t s = runs[r].slot; s < runs[r].slot + runs[r].n; s++, n++) {
            int64_t row = pk->row[s];
            uint16_t *dv = vals + n * nv;
            uint8_t *dq = pos + n * nq;
            pe_copy(dv, b->values + row * G + c0 * PE_TILE, 2 * gv);
            pe_copy(dq, b->positions + row * pstride + c0 * 8, gq);
            if (gv < nv) memset(dv + gv, 0, sizeof(uint16_t) * (size_t)(nv - gv));
            if (gq < nq) memset(dq + gq, 0, (size_t)(nq - gq));
            xs[n] = runs[r].x;
        }
    return n;
}

/* Prefetches the segments pe_stage will copy for runs[r0, r1) (the next batch): their rows lie
 * far apart (rank-major), so no hardware prefetcher sees them coming. */
static inline void pe_prefetch_batch(const pe_packed *pk, const pe_buckets *b,
                                     const pe_run *runs, int64_t r0, int64_t r1, int64_t c0,
                                     int64_t c1) {
    int64_t G = b->n_groups, pstride = (G + 1) / 2;
    int64_t gv = (G < c1 * PE_TILE ? G : c1 * PE_TILE) - c0 * PE_TILE;
    int64_t gq = (pstride < c1 * 8 ? pstride : c1 * 8) - c0 * 8;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t s = runs[r].slot; s < runs[r].slot + runs[r].n; s++) {
            const char *v = (const char *)(b->values + pk->row[s] * G + c0 * PE_TILE);
            const char *q = (const char *)(b->positions + pk->row[s] * pstride + c0 * 8);
            for (int64_t o = 0; o < 2 * gv; o += 64) __builtin_prefetch(v + o);
            __builtin_prefetch(v + 2 * gv - 1);
            for (int64_t o = 0; o < gq; o += 64) __builtin_prefetch(q + o);
            __builtin_prefetch(q + gq - 1);
        }
}

/* tasks (rows of B, in row order) -> y[16 g0, min(16 g1, n_out)) f32, overwritten. */
typedef void (*pe_bucketmul_fn)(const pe_buckets *b, const pe_task *tasks, int64_t n_tasks,
                                int64_t g0, int64_t g1, float *y);
/* runs (slots of P, rows of B) -> y[256 t0, min(256 t1, n_out)) f32, overwritten. */
typedef void (*pe_packedmul_fn)(const pe_packed *p, const pe_buckets *b, const pe_run *runs,
                                int64_t n_runs, int64_t t0, int64_t t1, float *y);
/* x (n_in,) f32 @ W[rows, j0:j1] (n_in, n_out) fp16 -> y[j0:j1] f32, overwritten; rows
 * (n_rows,) the inputs to sum over in order, or NULL for all n_in. */
typedef void (*pe_dense_fn)(const float *x, const uint16_t *w, int64_t n_in, int64_t n_out,
                            const int32_t *rows, int64_t n_rows, int64_t j0, int64_t j1,
                            float *y);

/* items of class c, items[begin[c], end[c]), through the tiered copy of P, added in that order
 * -> y[64 c0, min(64 c1, n_out)) f32, overwritten. */
typedef void (*pe_tiermul_fn)(const pe_packed *p, const pe_item *items,
                              const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                              int64_t c0, int64_t c1, float *y);

/* pe_select_items' contract (below): a build of the cutoff search for one ISA. */
typedef pe_status (*pe_select_items_fn)(const pe_packed *p, const float *x, double effort,
                                        pe_item *items, int64_t begin[PE_CLASSES],
                                        int64_t end[PE_CLASSES], int64_t *n_rows,
                                        int64_t *mults, uint32_t *scratch);

typedef struct {
    const char *name;
    pe_bucketmul_fn bucketmul_f16; /* canonical layout (the scalar spec), or NULL */
    pe_packedmul_fn packedmul_f16; /* input-major index (pe_packed), or NULL       */
    pe_dense_fn dense_f16;
    pe_tiermul_fn tiermul_f16;     /* tiered copy (pe_packed.tiers), or NULL        */
    pe_tiermul_fn permmul_f16;     /* permuted copy (pe_packed.perm), same contract, or NULL */
    pe_select_items_fn select_items; /* the search built for this ISA, or NULL: the portable */
} pe_cpu_kernels;

extern const pe_cpu_kernels pe_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const pe_cpu_kernels pe_kernels_avx2;
extern const pe_cpu_kernels pe_kernels_avx512;
extern const pe_cpu_kernels pe_kernels_avx512vbmi2;
#endif
#if defined(__aarch64__)
extern const pe_cpu_kernels pe_kernels_neon;
#endif

/* x (n_in,) f32 at effort -> tasks in row order; *n_tasks, *mults set. tasks sized n_rows. */
pe_status pe_select(const pe_buckets *b, const float *x, double effort, pe_task *tasks,
                    int64_t *n_tasks, int64_t *mults, uint32_t *scratch);
/* x (n_in,) f32 at effort -> runs (at most n_slots); *n_runs, *n_rows, *mults set.
 * scratch: 2 * 16 * n_in + 16 uint32. Same dispatched rows as pe_select (reference.cutoff). */
pe_status pe_select_packed(const pe_packed *p, const float *x, double effort, pe_run *runs,
                           int64_t *n_runs, int64_t *n_rows, int64_t *mults, uint32_t *scratch);

/* As pe_select_packed, but the dispatched inputs as items grouped by class: class cl is
 * items[begin[cl], end[cl]), in input order. items sized PE_CLASSES * n_in. */
pe_status pe_select_items(const pe_packed *p, const float *x, double effort, pe_item *items,
                          int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES], int64_t *n_rows,
                          int64_t *mults, uint32_t *scratch);
#if defined(__x86_64__) || defined(_M_X64)
pe_status pe_select_items_avx2(const pe_packed *p, const float *x, double effort, pe_item *items,
                               int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES],
                               int64_t *n_rows, int64_t *mults, uint32_t *scratch);
#endif
/* Builds p->tiers from b (tiers.c); leaves it NULL if a position repeats in a group. */
pe_status pe_build_tiers(const pe_buckets *b, pe_packed *p);
/* size bytes for an in-memory copy, 64-byte aligned, on 2 MiB pages where the system gives
 * them when large (the kernels walk many rows at once: TLB); NULL if out of memory (pack.c). */
void *pe_alloc_copy(size_t size);
/* Builds p->perm from b (perm.c); leaves it NULL if a position repeats in a group or a value
 * is not finite (then the routed kernels follow the reference). */
pe_status pe_build_perm(const pe_buckets *b, pe_packed *p);
/* The kernel set in use (dispatch.c): pack.c builds the copy it reads. */
const pe_cpu_kernels *pe_active_kernels(void);

/* Thread pool (threads.c): fn(ctx, c, n_chunks) for every chunk c in [0, n_chunks), on up to
 * n_threads threads (the caller included), in any order and assignment. */
typedef void (*pe_job_fn)(void *ctx, int c, int n_chunks);
pe_status pe_parallel(pe_job_fn fn, void *ctx, int n_chunks, int n_threads);
/* Asks an idle pool worker to read the n ranges (at most PE_WARM_RANGES) into the caches, in
 * order, while it waits for the next job (returns at once; nothing happens without a worker).
 * pe_pool_unwarm(owner) cancels a request with a range of that owner and returns once no
 * worker reads one: call it before freeing the owner's memory. */
#define PE_WARM_RANGES 16
typedef struct {
    const void *base, *owner;
    size_t len;
} pe_warm_range;
void pe_pool_warm(const pe_warm_range *ranges, int n);
void pe_pool_unwarm(const void *owner);
#endif
