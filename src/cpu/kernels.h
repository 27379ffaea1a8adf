/* The CPU core's internal contract: the input-major index and its in-memory layouts
 * (layout/), the selection's output (generic/select.c), the kernel signatures, the kernel-set
 * table entry (dispatch.c) and the thread pool (threads.c). */
#ifndef PE_KERNELS_H
#define PE_KERNELS_H
#include <string.h>

#include "pyeffort.h"

/* ---------------------------------------------------------------- selection output */

/* One dispatched input: its ranks in mask (bit k: rank k; not empty), multiplied by x. A
 * prefix of ranks when the input's statistics fall with rank (always, for matrices pe_build
 * makes, but for the padding ranks of a last group narrower than 16), any set otherwise. */
typedef struct {
    int32_t input;
    uint32_t mask;
    float x;
} pe_item;

/* Items are grouped by class 2 (T - 1) + partial: T the tiers up to the last one touched,
 * partial if a tier below T is not whole (then each tier keeps the ranks its 4 bits name). */
#define PE_TIER 4
#define PE_CLASSES 8
static inline int pe_item_class(uint32_t mask) {
    int top = 31 - __builtin_clz(mask), t = top / PE_TIER + 1;
    return 2 * (t - 1) + (mask != (1u << (PE_TIER * t)) - 1);
}

/* ---------------------------------------------------------------- kernels */

typedef struct pe_kernel_set pe_kernel_set;

/* items by class (class cl: items[begin[cl], end[cl]), added in that order) through p's
 * layout (b: the canonical rows p indexes) -> y[64 c0, min(64 c1, n_out)) f32, overwritten;
 * c0, c1 count chunks of 4 groups. */
typedef void (*pe_items_fn)(const pe_packed *p, const pe_buckets *b, const pe_item *items,
                            const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                            int64_t c0, int64_t c1, float *y);
/* x (n_in,) f32 @ W (n_in, n_out) fp16, inputs rows[r0:r1] (rows NULL: inputs r0..r1-1) ->
 * y[j0:j1] f32, overwritten; each output summed over those inputs in order. */
typedef void (*pe_dense_fn)(const float *x, const uint16_t *w, int64_t n_out,
                            const int32_t *rows, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                            float *y);
/* x (n_in,) f32 @ the Q8_0 matrix q (n_in, n_out) int8, scales (ceil(n_in / 32), n_out) fp16,
 * inputs r0..r1-1 (r0 a multiple of 32) -> y[j0:j1] f32, overwritten; per output, each block
 * of 32 inputs' sum of x_i q_ij in f32 (inputs in order) times its scale, added in block order. */
typedef void (*pe_dense_q8_fn)(const float *x, const int8_t *q, const uint16_t *scales,
                               int64_t n_out, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                               float *y);
#define PE_Q8_BLOCK 32 /* inputs per scale of the dense Q8_0 matrix */
/* x (n_in,) f32 at effort -> the dispatched inputs as items grouped by class: class cl is
 * items[begin[cl], end[cl]), in input order (items sized PE_CLASSES * n_in); *n_rows (rows
 * dispatched) and *mults set; reference.cutoff's rows. scratch: 2 * 16 * n_in + 16 uint32;
 * n_threads: the threads the search may split over. PE_ERR_NONFINITE if x is not finite. */
typedef pe_status (*pe_select_fn)(const pe_packed *p, const float *x, double effort,
                                  int n_threads, pe_item *items, int64_t begin[PE_CLASSES],
                                  int64_t end[PE_CLASSES], int64_t *n_rows, int64_t *mults,
                                  uint32_t *scratch);

/* The weights a kernel reads: the canonical rows in place through the index, or one of the
 * two in-memory copies (below). */
typedef enum { PE_CANONICAL, PE_PERMUTED, PE_TIERED } pe_layout;

/* A kernel set: the kernels of one CPU feature level; pe_pack builds the layout its
 * effort kernel for the matrix's value kind reads. */
struct pe_kernel_set {
    const char *name;
    unsigned needs;         /* PE_CPU_* features it runs on          */
    pe_layout layout;       /* what bucketmul reads (fp16 values)    */
    pe_items_fn bucketmul;
    pe_layout layout_q8;    /* what bucketmul_q8 reads (int8 values) */
    pe_items_fn bucketmul_q8;
    pe_dense_fn dense;
    pe_dense_q8_fn dense_q8;
    pe_select_fn select;
};

/* CPU features (arch/x86/cpu_x86.c, arch/arm/cpu_arm.c): what a kernel set needs. */
#define PE_CPU_AVX2 1u        /* AVX2, FMA, F16C and the OS's AVX state            */
#define PE_CPU_AVX512 2u      /* AVX-512 F, BW, VL, DQ and the OS's ZMM state      */
#define PE_CPU_AVX512VBMI2 4u /* AVX-512 VBMI2 and BMI2 (pext)                      */
#define PE_CPU_NEON 8u
/* The features this machine has (names: their names, space separated, for the user). */
unsigned pe_cpu_detect(char *names, size_t n);
/* The kernel set in use (dispatch.c), read once by a call. */
const pe_kernel_set *pe_active_set(void);

/* The kernels, by file: declared through their types' signatures. */
#define PE_ITEMS_KERNEL(name)                                                                \
    void name(const pe_packed *p, const pe_buckets *b, const pe_item *items,                 \
              const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES], int64_t c0,     \
              int64_t c1, float *y)
#define PE_DENSE_F16_KERNEL(name)                                                            \
    void name(const float *x, const uint16_t *w, int64_t n_out, const int32_t *rows, int64_t r0, \
              int64_t r1, int64_t j0, int64_t j1, float *y)
#define PE_DENSE_Q8_KERNEL(name)                                                             \
    void name(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_out,          \
              int64_t r0, int64_t r1, int64_t j0, int64_t j1, float *y)
PE_ITEMS_KERNEL(pe_bucketmul_f16_scalar);
PE_ITEMS_KERNEL(pe_tiers_f16_scalar);
PE_ITEMS_KERNEL(pe_bucketmul_q8_scalar);
PE_ITEMS_KERNEL(pe_tiers_q8_scalar);
PE_ITEMS_KERNEL(pe_perm_f16_scalar);
PE_DENSE_F16_KERNEL(pe_dense_f16_scalar);
PE_DENSE_Q8_KERNEL(pe_dense_q8_scalar);
pe_status pe_select_items(const pe_packed *p, const float *x, double effort, int n_threads,
                          pe_item *items, int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES],
                          int64_t *n_rows, int64_t *mults, uint32_t *scratch);
#if defined(__x86_64__) || defined(_M_X64)
PE_ITEMS_KERNEL(pe_tiers_f16_avx512vbmi2);
PE_ITEMS_KERNEL(pe_tiers_q8_avx512vbmi2);
PE_ITEMS_KERNEL(pe_perm_f16_avx2);
PE_ITEMS_KERNEL(pe_tiers_q8_avx2);
PE_DENSE_F16_KERNEL(pe_dense_f16_avx2);
PE_DENSE_F16_KERNEL(pe_dense_f16_avx512);
PE_DENSE_Q8_KERNEL(pe_dense_q8_avx2);
PE_DENSE_Q8_KERNEL(pe_dense_q8_avx512);
/* generic/select.c compiled again with -mavx2 (setup.py) */
pe_status pe_select_items_avx2(const pe_packed *p, const float *x, double effort, int n_threads,
                               pe_item *items, int64_t begin[PE_CLASSES],
                               int64_t end[PE_CLASSES], int64_t *n_rows, int64_t *mults,
                               uint32_t *scratch);
#endif
#if defined(__aarch64__)
PE_ITEMS_KERNEL(pe_perm_f16_neon);
PE_ITEMS_KERNEL(pe_tiers_q8_neon);
PE_DENSE_F16_KERNEL(pe_dense_f16_neon);
PE_DENSE_Q8_KERNEL(pe_dense_q8_neon);
#endif

/* ---------------------------------------------------------------- the index and its layouts */

/* The input-major index of a matrix (layout/index.c): slots are the canonical rows renumbered
 * input-major, so an input's dispatched ranks are one run of slots. Slot s = slot0[i] + k is
 * rank k of input i (k < n_loaded[i]) and canonical row row[s]. At most one in-memory copy of
 * the weights: the one the effort kernel of the set it was packed for reads (set->layout). */
struct pe_packed {
    const pe_kernel_set *set; /* the kernel set it was packed for: its layout and kernels */
    pe_items_fn bucketmul;    /* its effort kernel for this matrix's value kind           */
    int q8;                   /* int8 values with scales (PE_VALUES_Q8)                   */
    int32_t *scale_row;       /* q8: (n_in, 4) row of b->scales of tier t of input i (t n_in
                               * + the place of i in order[4t]), -1 if not loaded; else NULL */
    int32_t *row;             /* (n_slots,) canonical row of each slot                     */
    float *stats;             /* (n_in, 16) statistic of rank k of input i, 0 if not loaded */
    int32_t *slot0;           /* (n_in,) first slot of input i                             */
    uint8_t *n_loaded;        /* (n_in,) loaded ranks of input i (a prefix of its ranks)   */
    int64_t n_in, n_out, n_groups, n_chunks, n_slots; /* chunks of 4 groups: ceil(G / 4) */
    int64_t m[PE_RANKS];      /* real multiplications of a row of rank k                  */
    int64_t unloaded;         /* sum of m over the slots that are not loaded              */
    int monotone;             /* every input's stats fall with rank: its keys do, for any x
                               * (then a token dispatches a prefix of each input's ranks) */
    /* The tiered copy (layout/tiers.c), or NULL. */
    uint8_t *tiers;           /* tier rows, PE_TIER_CHUNK bytes per chunk                 */
    int64_t *tier_off;        /* (n_in,) byte offset of input i's first tier row          */
    /* The permuted copy (layout/perm.c), or NULL. */
    uint8_t *perm;            /* rank maps and rank-ordered values, per input             */
    int64_t *perm_off;        /* (n_in,) byte offset of input i's records                 */
    int64_t perm_bytes;       /* the copy's size                                          */
};

/* The tiered layout. Tier t of input i holds ranks 4t..4t+3 of every group in position order:
 * a tier row is n_chunks records of 40 bytes (chunk c = groups 4c..4c+3: a u64 of four 16-bit
 * masks, the positions of the tier's 4 ranks in each group, then 16 fp16 values, 4 per group
 * in position order), then n_chunks u32 rank codes (2 bits per value, in value order: its rank
 * inside the tier, 0..3), read only for a token that dispatches part of a tier. Tiers of one
 * input cover disjoint positions, so they merge into one vector per group before the multiply.
 * Unloaded ranks of a partly loaded tier are zero values at free positions, code 3. */
#define PE_TIER_CHUNK 44 /* bytes per chunk per tier row: 40 record + 4 rank codes */
#define PE_TIER_REC 40
/* Int8 values (q8): a record is 26 bytes, the u64 of masks, the 16 int8 values in position
 * order, then the fp16 scale of the tier over the chunk (1.5 bytes per weight plus 2 per 16:
 * the canonical q8 bytes); the rank codes as above. The tiers of an input do not merge (each
 * has its own scale): per record, x * scale once, then q * (x * scale) fused into the 64
 * outputs, zeros where the tier has no value. */
#define PE_TIER_CHUNK_Q8 30
#define PE_TIER_REC_Q8 26

/* The permuted layout, for kernels with a lane permute or table lookup but no expand (AVX2,
 * NEON). Per input i, at perm_off[i]: n_groups records of 16 bytes (the group's rank map, 8
 * bytes: byte b holds the rank of position b in its low nibble and of position b + 8 in its
 * high nibble; then the fp16 values of ranks 0..3 in rank order), then one row per further
 * loaded tier t = 1, 2, 3 (n_groups x 4 fp16: ranks 4t..4t+3). A kernel multiplies a group's
 * rank-ordered values by x where the item dispatches the rank and by 0 elsewhere, then gathers
 * them to their positions through the rank map (a lane permute): no per-weight routing, any
 * rank set. A position whose rank is not loaded names rank 15 (never dispatched then); values
 * of ranks not loaded are 0. */
#define PE_PERM_REC 16

/* Whether a weight of fp16 bits value at position pos may join a group whose positions so
 * far are *used (updated): its position is new and its value finite. The layouts hold one
 * weight per position and the fast kernels multiply weights they do not dispatch by 0 (inf * 0
 * is NaN), so a matrix that breaks this is damaged: pe_pack returns PE_ERR_FORMAT. */
static inline int pe_weight_ok(uint16_t *used, int pos, uint16_t value) {
    int ok = !(*used >> pos & 1) && (value & 0x7C00) != 0x7C00;
    *used |= (uint16_t)(1u << pos);
    return ok;
}

/* The same for an int8 value q (q8): its position is new and q is not -128 (outside the
 * symmetric range [-127, 127] the format allows). */
static inline int pe_weight_ok_q8(uint16_t *used, int pos, int8_t q) {
    int ok = !(*used >> pos & 1) && q != -128;
    *used |= (uint16_t)(1u << pos);
    return ok;
}

/* Whether a q8 scale (fp16 bits) is finite and not negative (-0 is allowed: it is 0). */
static inline int pe_scale_ok(uint16_t s) { return (s & 0x7C00) != 0x7C00 && s <= 0x8000; }

/* Position (0..15) of group g in the canonical positions row q (4 bits per group). */
static inline int pe_position(const uint8_t *q, int64_t g) {
    return (g & 1) ? q[g >> 1] >> 4 : q[g >> 1] & 15;
}

/* Builds p->tiers (layout/tiers.c; fp16 or q8 records) or p->perm (layout/perm.c; fp16 only)
 * from b through the index, on n_threads threads; PE_ERR_FORMAT if b is damaged (pe_weight_ok,
 * pe_weight_ok_q8, pe_scale_ok). Both hold any matrix that is not, and both kernels take any
 * rank set. */
pe_status pe_build_tiers(const pe_buckets *b, pe_packed *p, int n_threads);
/* 1 if every scale the loaded tiers of input i read is pe_scale_ok (always 1 for fp16). */
int pe_scales_ok(const pe_buckets *b, const pe_packed *p, int64_t i);
pe_status pe_build_perm(const pe_buckets *b, pe_packed *p, int n_threads);
/* size bytes for an in-memory copy, 64-byte aligned, on 2 MiB pages where the system gives
 * them when large (the kernels walk many rows at once: TLB); NULL if out of memory. */
void *pe_alloc_copy(size_t size);

/* ---------------------------------------------------------------- small helpers */

/* A spin-wait's pause (threads.c, and waits inside a job). */
static inline void pe_cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Bits set in a 32-bit mask (no popcnt instruction in the portable files: libgcc's is a call). */
static inline int pe_popcount(uint32_t v) {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (int)((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

/* ---------------------------------------------------------------- thread pool */

/* fn(ctx, c, n_chunks) for every chunk c in [0, n_chunks), on up to n_threads threads (the
 * caller included), in any order and assignment. */
typedef void (*pe_job_fn)(void *ctx, int c, int n_chunks);
pe_status pe_parallel(pe_job_fn fn, void *ctx, int n_chunks, int n_threads);
/* Cores this process may run on: the default thread count. */
int pe_default_threads(void);
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
