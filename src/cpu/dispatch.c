/* Drivers: pick the CPU kernel set once, run selection and kernels per token, split the
 * outputs over the thread pool (disjoint ranges: deterministic for any thread count). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

void pe_detect_cpu(void);
const pe_cpu_kernels *const *pe_tiers(int *n);
int pe_default_threads(void);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const pe_cpu_kernels *active;
static int n_threads = 1;
static char available[128];

static void init(void) {
    int n;
    pe_detect_cpu();
    const pe_cpu_kernels *const *t = pe_tiers(&n);
    active = t[0];
    for (int i = 0; i < n; i++) {
        if (i) strcat(available, ",");
        strcat(available, t[i]->name);
    }
    n_threads = pe_default_threads();
}

static const pe_cpu_kernels *kernels(void) {
    pthread_once(&once, init);
    return active;
}

/* The active kernel set's build of the cutoff search (the portable one if it has none). */
static pe_status select_items_isa(const pe_packed *p, const float *x, double effort,
                                  pe_item *items, int64_t begin[PE_CLASSES],
                                  int64_t end[PE_CLASSES], int64_t *n_rows, int64_t *mults,
                                  uint32_t *scratch) {
    pe_select_items_fn fn = kernels()->select_items ? kernels()->select_items : pe_select_items;
    return fn(p, x, effort, items, begin, end, n_rows, mults, scratch);
}

const char *pe_kernel_name(void) { return kernels()->name; }
int pe_kernel_packed(void) { return kernels()->packedmul_f16 != NULL; }

const pe_cpu_kernels *pe_active_kernels(void) { return kernels(); }
const char *pe_available_kernels(void) {
    kernels();
    return available;
}

pe_status pe_use_kernel(const char *name) {
    int n;
    kernels();
    const pe_cpu_kernels *const *t = pe_tiers(&n);
    for (int i = 0; i < n; i++)
        if (strcmp(t[i]->name, name) == 0) {
            active = t[i];
            return PE_OK;
        }
    return PE_ERR_ARG;
}

int pe_num_threads(void) {
    kernels();
    return n_threads;
}
void pe_set_num_threads(int n) {
    kernels();
    n_threads = n < 1 ? 1 : n;
}

/* Threads for a job over n_items units touching bytes: one for small jobs. */
static int threads_for(int64_t n_items, int64_t bytes) {
    int n = n_threads;
    if (bytes < (64 << 10)) n = 1;
    if (n > n_items) n = (int)(n_items > 0 ? n_items : 1);
    return n;
}

/* Chunks for nt threads: a few per thread, so a thread the OS delays leaves its share. */
static int chunks_for(int64_t n_items, int nt) {
    int64_t n = nt <= 1 ? 1 : 4 * (int64_t)nt;
    return (int)(n < n_items ? n : (n_items > 0 ? n_items : 1));
}

/* Per-thread scratch that grows and is kept (no malloc per call). */
static void *scratch(size_t n, int which) {
    static _Thread_local void *buf[4];
    static _Thread_local size_t cap[4];
    if (cap[which] < n) {
        free(buf[which]);
        buf[which] = malloc(n);
        cap[which] = buf[which] ? n : 0;
    }
    return buf[which];
}

/* Chunk t of n: [t * n_items / n, (t + 1) * n_items / n) rounded to multiples of align. */
static void split(int64_t n_items, int64_t align, int t, int n, int64_t *i0, int64_t *i1) {
    int64_t units = (n_items + align - 1) / align;
    *i0 = units * t / n * align;
    *i1 = units * (t + 1) / n * align;
    if (*i1 > n_items) *i1 = n_items;
    if (*i0 > n_items) *i0 = n_items;
}

/* ---------------------------------------------------------------- canonical (scalar spec) */

typedef struct {
    const pe_cpu_kernels *kern;
    const pe_buckets *b;
    const pe_task *tasks;
    int64_t n_tasks;
    float *y;
} canon_job;

static void canon_run(void *ctx, int t, int n) {
    canon_job *j = ctx;
    int64_t g0, g1;
    split(j->b->n_groups, 4, t, n, &g0, &g1);
    if (g1 > g0) j->kern->bucketmul_f16(j->b, j->tasks, j->n_tasks, g0, g1, j->y);
}

pe_status pe_bucketmul(const pe_buckets *b, const float *x, int64_t n_tokens, double effort,
                       float *y, int64_t *mults, int64_t *bytes) {
    const pe_cpu_kernels *kern = kernels();
    if (!kern->bucketmul_f16) kern = &pe_kernels_scalar;
    int64_t row_bytes = 2 * b->n_groups + (b->n_groups + 1) / 2;
    uint32_t *sc = scratch(sizeof(uint32_t) * (size_t)(2 * b->n_rows + 1), 0);
    pe_task *tasks = scratch(sizeof(pe_task) * (size_t)(b->n_rows + 1), 1);
    if (!sc || !tasks) return PE_ERR_ALLOC;
    for (int64_t t = 0; t < n_tokens; t++) {
        int64_t n_tasks = 0, done = 0;
        pe_status st = pe_select(b, x + t * b->n_in, effort, tasks, &n_tasks, &done, sc);
        if (st != PE_OK) return st;
        canon_job job = {kern, b, tasks, n_tasks, y + t * b->n_out};
        int nt = threads_for(b->n_groups / 4, n_tasks * row_bytes);
        if ((st = pe_parallel(canon_run, &job, chunks_for(b->n_groups / 4, nt), nt)) != PE_OK)
            return st;
        *mults += done;
        *bytes += n_tasks * row_bytes;
    }
    return PE_OK;
}

/* ------------------------------------------------ input-major index (SIMD kernels) */

typedef struct {
    pe_packedmul_fn fn;
    const pe_packed *p;
    const pe_buckets *b;
    const pe_run *runs;
    int64_t n_runs;
    float *y;
} packed_job;

static void packed_run(void *ctx, int t, int n) {
    packed_job *j = ctx;
    int64_t t0, t1;
    split(j->p->n_tiles, 2, t, n, &t0, &t1); /* even starts: a tile's routing never depends on n */
    if (t1 > t0) j->fn(j->p, j->b, j->runs, j->n_runs, t0, t1, j->y);
}

/* ------------------------------------- tiered or permuted copy (expand, permute kernels) */

/* The dispatched inputs are cut into TIER_PARTS fixed parts (half of each class each), summed
 * into their own outputs and added in part order: threads walk whole rows (the column split
 * shortens every row walk), and the sum order never depends on the thread count. */
#ifndef TIER_PARTS
#define TIER_PARTS 2
#endif

typedef struct {
    pe_tiermul_fn fn;
    const pe_packed *p;
    const pe_item *items;
    int64_t begin[TIER_PARTS][PE_CLASSES], end[TIER_PARTS][PE_CLASSES];
    int ranges; /* column ranges per part */
    float *y[TIER_PARTS];
} tier_job;

static void tier_run(void *ctx, int t, int n) {
    tier_job *j = ctx;
    int part = t % TIER_PARTS;
    int64_t c0, c1;
    (void)n;
    split(j->p->n_chunks, 1, t / TIER_PARTS, j->ranges, &c0, &c1);
    if (c1 > c0) j->fn(j->p, j->items, j->begin[part], j->end[part], c0, c1, j->y[part]);
}

/* The parts of the items of each class (class cl: items[begin[cl], end[cl])). */
static void cut_parts(const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                      tier_job *j) {
    for (int cl = 0; cl < PE_CLASSES; cl++)
        for (int q = 0; q < TIER_PARTS; q++) {
            int64_t n = end[cl] - begin[cl];
            j->begin[q][cl] = begin[cl] + n * q / TIER_PARTS;
            j->end[q][cl] = begin[cl] + n * (q + 1) / TIER_PARTS;
        }
}

/* The kernel job of one selection (items by class in [begin, end), n_rows rows) writing y,
 * parts past the first into extra ((TIER_PARTS - 1) n_out); returns the threads it needs. The
 * parts and column ranges depend only on the selection, never on who runs it: the same bits. */
static int tier_job_for(tier_job *j, pe_tiermul_fn fn, const pe_packed *p, const pe_item *items,
                        const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                        int64_t n_rows, float *y, float *extra) {
    int64_t row_bytes = 2 * p->n_groups + (p->n_groups + 1) / 2;
    *j = (tier_job){.fn = fn, .p = p, .items = items};
    cut_parts(begin, end, j);
    j->y[0] = y;
    for (int q = 1; q < TIER_PARTS; q++) j->y[q] = extra + (q - 1) * p->n_out;
    int nt = threads_for(p->n_chunks, n_rows * row_bytes);
    j->ranges = nt > TIER_PARTS ? nt / TIER_PARTS : 1;
    return nt;
}

/* y += the parts past the first, in part order. */
static void add_parts(const tier_job *j) {
    for (int q = 1; q < TIER_PARTS; q++)
        for (int64_t o = 0; o < j->p->n_out; o++) j->y[0][o] += j->y[q][o];
}

/* One token's selection on one thread while another reads the matrix's permuted copy from its
 * start into the caches, until the selection is done: in decoding the copy comes from DRAM, and
 * the kernel that follows then finds part of it nearer. */
typedef struct {
    const pe_packed *p;
    const float *x;
    double effort;
    pe_item *items;
    int64_t *begin, *end, n_rows, done;
    uint32_t *sc;
    pe_status st;
    atomic_int selected;
} select_warm;

static void select_or_warm(void *ctx, int c, int n) {
    select_warm *j = ctx;
    (void)n;
    if (c == 0) {
        j->st = select_items_isa(j->p, j->x, j->effort, j->items, j->begin, j->end, &j->n_rows,
                                 &j->done, j->sc);
        atomic_store_explicit(&j->selected, 1, memory_order_release);
        return;
    }
    const volatile uint8_t *a = j->p->perm;
    uint8_t sink = 0;
    for (int64_t o = 0; o < j->p->perm_bytes; o += 64) { /* a load per line */
        if ((o & 4095) == 0 && atomic_load_explicit(&j->selected, memory_order_relaxed)) break;
        sink ^= a[o];
    }
    (void)sink;
}

/* pe_select_items, with the copy warmed by a second thread when one is free and the search
 * costs something (effort < 1). */
static pe_status select_items(const pe_packed *p, const float *x, double effort, pe_item *items,
                              int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES],
                              int64_t *n_rows, int64_t *done, uint32_t *sc) {
    if (n_threads < 2 || !p->perm || !(effort < 1.0))
        return select_items_isa(p, x, effort, items, begin, end, n_rows, done, sc);
    select_warm j = {.p = p, .x = x, .effort = effort, .items = items, .begin = begin,
                     .end = end, .sc = sc, .st = PE_OK};
    atomic_init(&j.selected, 0);
    pe_status st = pe_parallel(select_or_warm, &j, 2, 2);
    *n_rows = j.n_rows;
    *done = j.done;
    return st != PE_OK ? st : j.st;
}

static pe_status bucketmul_items(pe_tiermul_fn fn, const pe_packed *p, const float *x,
                                 int64_t n_tokens, double effort, float *y, int64_t *mults,
                                 int64_t *bytes) {
    int64_t row_bytes = 2 * p->n_groups + (p->n_groups + 1) / 2, n_keys = p->n_in * PE_RANKS;
    uint32_t *sc = scratch(sizeof(uint32_t) * (size_t)(2 * n_keys + PE_RANKS), 0);
    pe_item *items = scratch(sizeof(pe_item) * (size_t)(PE_CLASSES * p->n_in + 1), 2);
    float *extra = scratch(sizeof(float) * (size_t)((TIER_PARTS - 1) * p->n_out + 1), 3);
    if (!sc || !items || !extra) return PE_ERR_ALLOC;
    for (int64_t t = 0; t < n_tokens; t++) {
        int64_t begin[PE_CLASSES], end[PE_CLASSES], n_rows = 0, done = 0;
        pe_status st = select_items(p, x + t * p->n_in, effort, items, begin, end, &n_rows,
                                    &done, sc);
        if (st != PE_OK) return st;
        tier_job job;
        int nt = tier_job_for(&job, fn, p, items, begin, end, n_rows, y + t * p->n_out, extra);
        if ((st = pe_parallel(tier_run, &job, TIER_PARTS * job.ranges, nt)) != PE_OK)
            return st;
        add_parts(&job);
        *mults += done;
        *bytes += n_rows * row_bytes;
    }
    return PE_OK;
}

pe_status pe_bucketmul_packed(const pe_packed *p, const pe_buckets *b, const float *x,
                              int64_t n_tokens, double effort, float *y, int64_t *mults,
                              int64_t *bytes) {
    const pe_cpu_kernels *kern = kernels();
    if (b->n_rows != p->n_slots || b->n_in != p->n_in) return PE_ERR_ARG;
    if (kern->tiermul_f16 && p->tiers)
        return bucketmul_items(kern->tiermul_f16, p, x, n_tokens, effort, y, mults, bytes);
    if (kern->permmul_f16 && p->perm)
        return bucketmul_items(kern->permmul_f16, p, x, n_tokens, effort, y, mults, bytes);
    if (!kern->packedmul_f16) return PE_ERR_ARG;
    int64_t row_bytes = 2 * p->n_groups + (p->n_groups + 1) / 2, n_keys = p->n_in * PE_RANKS;
    uint32_t *sc = scratch(sizeof(uint32_t) * (size_t)(2 * n_keys + PE_RANKS), 0);
    pe_run *runs = scratch(sizeof(pe_run) * (size_t)(p->n_slots + 1), 2);
    if (!sc || !runs) return PE_ERR_ALLOC;
    for (int64_t t = 0; t < n_tokens; t++) {
        int64_t n_runs = 0, n_rows = 0, done = 0;
        pe_status st = pe_select_packed(p, x + t * p->n_in, effort, runs, &n_runs, &n_rows,
                                        &done, sc);
        if (st != PE_OK) return st;
        packed_job job = {kern->packedmul_f16, p, b, runs, n_runs, y + t * p->n_out};
        int nt = threads_for(p->n_tiles / 2, n_rows * row_bytes);
        if ((st = pe_parallel(packed_run, &job, chunks_for(p->n_tiles / 2, nt), nt)) != PE_OK)
            return st;
        *mults += done;
        *bytes += n_rows * row_bytes;
    }
    return PE_OK;
}

/* ------------------------------------------------ a group of matrices that share x */

/* Per matrix of a group: its selection's outputs and scratch, its kernel job, and whether both
 * are ready (set by the thread that ran the selection). */
typedef struct {
    const pe_packed *p;
    double effort;
    uint32_t *sc;
    pe_item *items;
    float *extra;
    float *y;
    pe_tiermul_fn fn;
    int64_t begin[PE_CLASSES], end[PE_CLASSES], n_rows, done;
    pe_status st;
    tier_job job;
    atomic_int ready;
} group_member;

typedef struct {
    group_member *m;
    const float *x;
    int n, per; /* matrices; kernel chunks per matrix (the most any selection can need) */
} group_job;

/* Matrix j's cutoff search and kernel job (its first pass inline: the pool is busy here). */
static void group_select(group_job *g, int j) {
    group_member *m = g->m + j;
    m->st = select_items_isa(m->p, g->x, m->effort, m->items, m->begin, m->end, &m->n_rows,
                             &m->done, m->sc);
    if (m->st == PE_OK) /* as a call alone: the same parts and column ranges, so the same bits */
        tier_job_for(&m->job, m->fn, m->p, m->items, m->begin, m->end, m->n_rows, m->y,
                     m->extra);
    atomic_store_explicit(&m->ready, 1, memory_order_release);
}

/* Chunks 0..n-1: the selections; then per matrix `per` kernel chunks, which wait for their
 * matrix's selection (claimed earlier, so running or done): a thread past the selections starts
 * on the first matrix's kernel while another still selects for the last. */
static void group_chunk(void *ctx, int c, int n_chunks) {
    group_job *g = ctx;
    (void)n_chunks;
    if (c < g->n) {
        group_select(g, c);
        return;
    }
    group_member *m = g->m + (c - g->n) / g->per;
    int q = (c - g->n) % g->per;
    while (!atomic_load_explicit(&m->ready, memory_order_acquire)) pe_cpu_relax();
    if (m->st == PE_OK && q < TIER_PARTS * m->job.ranges) tier_run(&m->job, q, 0);
}

pe_status pe_bucketmul_group(int n, const pe_packed *const *ps, const pe_buckets *const *bs,
                             const float *x, const double *efforts, float *const *ys,
                             int64_t *mults, int64_t *bytes) {
    const pe_cpu_kernels *kern = kernels();
    if (n < 1 || n > PE_MAX_GROUP) return PE_ERR_ARG;
    for (int j = 0; j < n; j++) {
        if (bs[j]->n_rows != ps[j]->n_slots || bs[j]->n_in != ps[j]->n_in ||
            ps[j]->n_in != ps[0]->n_in)
            return PE_ERR_ARG;
    }
    pe_tiermul_fn fn[PE_MAX_GROUP];
    int items_path = 1;
    for (int j = 0; j < n; j++) {
        fn[j] = kern->tiermul_f16 && ps[j]->tiers  ? kern->tiermul_f16
                : kern->permmul_f16 && ps[j]->perm ? kern->permmul_f16
                                                   : NULL;
        items_path &= fn[j] != NULL;
    }
    /* a matrix without an in-memory copy, or one thread (nothing to overlap, and one call's
     * scratch stays in cache): one call after another */
    if (!items_path || n_threads < 2) {
        for (int j = 0; j < n; j++) {
            pe_status st = pe_bucketmul_packed(ps[j], bs[j], x, 1, efforts[j], ys[j], mults + j,
                                               bytes + j);
            if (st != PE_OK) return st;
        }
        return PE_OK;
    }
    /* every member's scratch in one buffer of the calling thread */
    int64_t n_in = ps[0]->n_in, n_keys = n_in * PE_RANKS, per_sc = 2 * n_keys + PE_RANKS;
    size_t total = 0, off_items, off_extra[PE_MAX_GROUP];
    total += sizeof(uint32_t) * (size_t)(n * per_sc);
    total = (total + 63) & ~(size_t)63;
    off_items = total;
    total += sizeof(pe_item) * (size_t)(n * (PE_CLASSES * n_in + 1));
    for (int j = 0; j < n; j++) {
        total = (total + 63) & ~(size_t)63;
        off_extra[j] = total;
        total += sizeof(float) * (size_t)((TIER_PARTS - 1) * ps[j]->n_out + 1);
    }
    char *buf = scratch(total, 0);
    if (!buf) return PE_ERR_ALLOC;
    group_member m[PE_MAX_GROUP];
    for (int j = 0; j < n; j++) {
        m[j].p = ps[j];
        m[j].effort = efforts[j];
        m[j].sc = (uint32_t *)buf + j * per_sc;
        m[j].items = (pe_item *)(buf + off_items) + j * (PE_CLASSES * n_in + 1);
        m[j].extra = (float *)(buf + off_extra[j]);
        m[j].y = ys[j];
        m[j].fn = fn[j];
        atomic_init(&m[j].ready, 0);
    }
    int ranges = n_threads > TIER_PARTS ? n_threads / TIER_PARTS : 1; /* tier_job_for's most */
    group_job g = {m, x, n, TIER_PARTS * ranges};
    pe_status st = pe_parallel(group_chunk, &g, n + n * g.per, n_threads);
    if (st != PE_OK) return st;
    for (int j = 0; j < n; j++) {
        if (m[j].st != PE_OK) return m[j].st;
        const pe_packed *p = ps[j];
        int64_t row_bytes = 2 * p->n_groups + (p->n_groups + 1) / 2;
        add_parts(&m[j].job);
        mults[j] += m[j].done;
        bytes[j] += m[j].n_rows * row_bytes;
    }
    return PE_OK;
}

/* ---------------------------------------------------------------- dense */

typedef struct {
    pe_dense_fn fn;
    const float *x;
    const uint16_t *w;
    int64_t n_in, n_out;
    const int32_t *rows;
    int64_t n_rows;
    float *y;
} dense_job;

static void dense_run(void *ctx, int t, int n) {
    dense_job *j = ctx;
    int64_t j0, j1;
    split(j->n_out, 64, t, n, &j0, &j1);
    if (j1 > j0) j->fn(j->x, j->w, j->n_in, j->n_out, j->rows, j->n_rows, j0, j1, j->y);
}

pe_status pe_dense_rows_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                            int64_t n_out, const int32_t *rows, int64_t n_rows, float *y) {
    const pe_cpu_kernels *kern = kernels();
    int64_t used = rows ? n_rows : n_in;
    for (int64_t i = 0; rows && i < n_rows; i++)
        if (rows[i] < 0 || rows[i] >= n_in) return PE_ERR_ARG;
    /* the dense product is memory-bound: below a few MiB (in cache) a second thread's hand-off
     * costs about what it saves, so small matrices stay on one thread */
    int nt = 2 * used * n_out < (4 << 20) ? 1 : threads_for((n_out + 63) / 64, 2 * used * n_out);
    int nc = nt; /* one column range per thread: shorter row segments cost stream restarts */
    for (int64_t t = 0; t < n_tokens; t++) {
        dense_job job = {kern->dense_f16, x + t * n_in, w, n_in, n_out, rows, n_rows,
                         y + t * n_out};
        pe_status st = pe_parallel(dense_run, &job, nc, nt);
        if (st != PE_OK) return st;
    }
    return PE_OK;
}

pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                       int64_t n_out, float *y) {
    return pe_dense_rows_f16(x, w, n_tokens, n_in, n_out, NULL, n_in, y);
}
