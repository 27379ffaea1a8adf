/* The per-call drivers: per token, the cutoff search and then the kernel over the thread
 * pool, for one matrix, a group of matrices that share x, and the dense product. A call reads
 * the thread count once and sizes and runs its jobs with it; the work is split into parts and
 * ranges that never depend on who runs them, so any thread count gives the same bits. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Threads for a job over n_items units touching bytes, at most nt: one for small jobs. */
static int threads_for(int64_t n_items, int64_t bytes, int nt) {
    if (bytes < (64 << 10)) nt = 1;
    if (nt > n_items) nt = (int)(n_items > 0 ? n_items : 1);
    return nt;
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

/* Canonical bytes of one dispatched row: its fp16 (q8: int8) values and 4-bit positions. */
static int64_t row_bytes(const pe_packed *p) {
    return (p->q8 ? 1 : 2) * p->n_groups + (p->n_groups + 1) / 2;
}

/* Canonical bytes of one selection (items by class in [begin, end), n_rows rows): its rows, and
 * for q8 the scales of each dispatched tier of an input (reference.bucketmul's count). */
static int64_t selection_bytes(const pe_packed *p, const pe_item *items,
                               const int64_t begin[PE_CLASSES], const int64_t end[PE_CLASSES],
                               int64_t n_rows) {
    int64_t tiers = 0;
    for (int cl = 0; p->q8 && cl < PE_CLASSES; cl++)
        for (int64_t u = begin[cl]; u < end[cl]; u++)
            for (uint32_t m = items[u].mask; m; m >>= PE_TIER) tiers += (m & 15) != 0;
    return n_rows * row_bytes(p) + tiers * 2 * p->n_chunks;
}

/* ---------------------------------------------------------------- one selection's kernel job */

/* The dispatched inputs are cut into parts (an equal share of each class each), their number
 * fixed by the selection's bytes alone, each summed into its own output and the parts added in
 * order, so any thread count gives the same bits; each part's columns are cut into as many
 * ranges as the threads need. A chunk walks whole rows of its part's inputs: a long run of the
 * copy that the prefetchers follow (cutting the columns alone gave each of 16 threads a few
 * hundred bytes of every row: short streams, and no scaling past 4 threads on a 16-core Xeon). */
#ifndef PE_KERNEL_MAX_PARTS
#define PE_KERNEL_MAX_PARTS 16 /* partial outputs: 4 bytes per part and output, twice       */
#endif
#define KERNEL_PART_BYTES (512 << 10) /* a part's selection bytes at least                    */
#define KERNEL_CHUNKS 2               /* chunks per thread: slack for one that starts late    */

typedef struct {
    const pe_packed *p;
    const pe_buckets *b;
    const pe_item *items;
    int64_t begin[PE_KERNEL_MAX_PARTS][PE_CLASSES], end[PE_KERNEL_MAX_PARTS][PE_CLASSES];
    int parts, ranges;
    float *y, *extra; /* part 0 -> y, part q > 0 -> extra + (q - 1) n_out */
} kernel_job;

/* Chunk c: part c / ranges, column range c % ranges. */
static void kernel_run(void *ctx, int c, int n) {
    kernel_job *j = ctx;
    int part = c / j->ranges;
    int64_t c0, c1;
    (void)n;
    split(j->p->n_chunks, 1, c % j->ranges, j->ranges, &c0, &c1);
    float *y = part ? j->extra + (part - 1) * j->p->n_out : j->y;
    if (c1 > c0) j->p->bucketmul(j->p, j->b, j->items, j->begin[part], j->end[part], c0, c1, y);
}

/* The kernel job of one selection (items by class in [begin, end), sel_bytes of rows) writing y,
 * parts past the first into extra ((PE_KERNEL_MAX_PARTS - 1) n_out), for at most nt threads;
 * returns the threads it needs. The parts depend only on the selection, never on nt. */
static int kernel_job_for(kernel_job *j, const pe_packed *p, const pe_buckets *b,
                          const pe_item *items, const int64_t begin[PE_CLASSES],
                          const int64_t end[PE_CLASSES], int64_t sel_bytes, float *y, float *extra,
                          int nt) {
    *j = (kernel_job){.p = p, .b = b, .items = items, .y = y, .extra = extra};
    int64_t parts = sel_bytes / KERNEL_PART_BYTES, want;
    j->parts = (int)(parts < 1 ? 1 : parts > PE_KERNEL_MAX_PARTS ? PE_KERNEL_MAX_PARTS : parts);
    for (int cl = 0; cl < PE_CLASSES; cl++)
        for (int q = 0; q < j->parts; q++) {
            int64_t n = end[cl] - begin[cl];
            j->begin[q][cl] = begin[cl] + n * q / j->parts;
            j->end[q][cl] = begin[cl] + n * (q + 1) / j->parts;
        }
    nt = threads_for(p->n_chunks, sel_bytes, nt);
    want = nt > 1 ? ((int64_t)KERNEL_CHUNKS * nt + j->parts - 1) / j->parts : 1;
    j->ranges = (int)(want < p->n_chunks ? want : p->n_chunks);
    if (nt > j->parts * j->ranges) nt = j->parts * j->ranges;
    return nt;
}

/* Columns t of n of y (n_out): y += parts 1..parts-1 (extra + (q - 1) n_out), in part order;
 * the one reduction of the effort and the dense jobs. */
static void add_partials(float *y, const float *extra, int64_t n_out, int parts, int t, int n) {
    int64_t o0, o1;
    split(n_out, 64, t, n, &o0, &o1);
    for (int q = 1; q < parts; q++) {
        const float *e = extra + (q - 1) * n_out;
        for (int64_t o = o0; o < o1; o++) y[o] += e[o];
    }
}

static void kernel_reduce(void *ctx, int t, int n) {
    kernel_job *j = ctx;
    add_partials(j->y, j->extra, j->p->n_out, j->parts, t, n);
}

/* Adds the parts (on the pool when there are several and outputs enough to share). */
static pe_status add_parts(kernel_job *j, int nt) {
    if (j->parts < 2) return PE_OK;
    int n = (int)((j->p->n_out + 1023) / 1024);
    return pe_parallel(kernel_reduce, j, n < nt ? n : nt, n < nt ? n : nt);
}

/* ---------------------------------------------------------------- the cutoff search */

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
        j->st = j->p->set->select(j->p, j->x, j->effort, 1, j->items, j->begin, j->end,
                                  &j->n_rows, &j->done, j->sc);
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

/* p's selection, with its permuted copy warmed by a second thread when one is free (nt >= 2)
 * and the search costs something (effort < 1). */
static pe_status select_items(const pe_packed *p, const float *x, double effort, int nt,
                              pe_item *items, int64_t begin[PE_CLASSES], int64_t end[PE_CLASSES],
                              int64_t *n_rows, int64_t *done, uint32_t *sc) {
    if (nt < 2 || !p->perm || !(effort < 1.0))
        return p->set->select(p, x, effort, nt, items, begin, end, n_rows, done, sc);
    select_warm j = {.p = p, .x = x, .effort = effort, .items = items, .begin = begin,
                     .end = end, .sc = sc, .st = PE_OK};
    atomic_init(&j.selected, 0);
    pe_status st = pe_parallel(select_or_warm, &j, 2, 2);
    *n_rows = j.n_rows;
    *done = j.done;
    return st != PE_OK ? st : j.st;
}

/* Scratch words of one selection (2 * 16 n_in + 16) and items (PE_CLASSES n_in + 1). */
static int64_t select_words(int64_t n_in) { return 2 * n_in * PE_RANKS + PE_RANKS; }
static int64_t item_count(int64_t n_in) { return PE_CLASSES * n_in + 1; }

/* ---------------------------------------------------------------- one matrix */

pe_status pe_bucketmul(const pe_packed *p, const pe_buckets *b, const float *x, int64_t n_tokens,
                       double effort, float *y, int64_t *mults, int64_t *bytes) {
    if (b->n_rows != p->n_slots || b->n_in != p->n_in || b->n_out != p->n_out) return PE_ERR_ARG;
    int nt = pe_num_threads(); /* once: the jobs are sized and run with it */
    uint32_t *sc = scratch(sizeof(uint32_t) * (size_t)select_words(p->n_in), 0);
    pe_item *items = scratch(sizeof(pe_item) * (size_t)item_count(p->n_in), 1);
    size_t n_extra = (size_t)((PE_KERNEL_MAX_PARTS - 1) * p->n_out + 1);
    float *extra = scratch(sizeof(float) * n_extra, 2);
    if (!sc || !items || !extra) return PE_ERR_ALLOC;
    for (int64_t t = 0; t < n_tokens; t++) {
        int64_t begin[PE_CLASSES], end[PE_CLASSES], n_rows = 0, done = 0;
        pe_status st =
            select_items(p, x + t * p->n_in, effort, nt, items, begin, end, &n_rows, &done, sc);
        if (st != PE_OK) return st;
        kernel_job job;
        int jt = kernel_job_for(&job, p, b, items, begin, end, n_rows * row_bytes(p),
                                y + t * p->n_out, extra, nt);
        if ((st = pe_parallel(kernel_run, &job, job.parts * job.ranges, jt)) != PE_OK ||
            (st = add_parts(&job, nt)) != PE_OK)
            return st;
        *mults += done;
        *bytes += selection_bytes(p, items, begin, end, n_rows);
    }
    return PE_OK;
}

/* ---------------------------------------------------------------- matrices that share x */

/* Per matrix of a group: its selection's outputs and scratch, its kernel job, and whether both
 * are ready (set by the thread that ran the selection). */
typedef struct {
    const pe_packed *p;
    const pe_buckets *b;
    double effort;
    uint32_t *sc;
    pe_item *items;
    float *extra;
    float *y;
    int64_t begin[PE_CLASSES], end[PE_CLASSES], n_rows, done;
    pe_status st;
    kernel_job job;
    atomic_int ready;
} group_member;

typedef struct {
    group_member *m;
    const float *x;
    int n, per, nt; /* matrices; kernel chunks per matrix (the most a job for nt can need) */
} group_job;

/* Matrix j's cutoff search and kernel job (its search on this thread: the pool is busy). */
static void group_select(group_job *g, int j) {
    group_member *m = g->m + j;
    m->st = m->p->set->select(m->p, g->x, m->effort, 1, m->items, m->begin, m->end, &m->n_rows,
                              &m->done, m->sc);
    if (m->st == PE_OK) /* as a call alone: the same parts and ranges, so the same bits */
        kernel_job_for(&m->job, m->p, m->b, m->items, m->begin, m->end,
                       m->n_rows * row_bytes(m->p), m->y, m->extra, g->nt);
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
    if (m->st == PE_OK && q < m->job.parts * m->job.ranges) kernel_run(&m->job, q, 0);
}

/* Every member's scratch, in one buffer of the calling thread; NULL if out of memory. */
static pe_status group_scratch(int n, const pe_packed *const *ps, group_member *m) {
    int64_t n_in = ps[0]->n_in, per_sc = select_words(n_in);
    size_t total = sizeof(uint32_t) * (size_t)(n * per_sc), off_items, off_extra[PE_MAX_GROUP];
    total = (total + 63) & ~(size_t)63;
    off_items = total;
    total += sizeof(pe_item) * (size_t)(n * item_count(n_in));
    for (int j = 0; j < n; j++) {
        total = (total + 63) & ~(size_t)63;
        off_extra[j] = total;
        total += sizeof(float) * (size_t)((PE_KERNEL_MAX_PARTS - 1) * ps[j]->n_out + 1);
    }
    char *buf = scratch(total, 0);
    if (!buf) return PE_ERR_ALLOC;
    for (int j = 0; j < n; j++) {
        m[j].sc = (uint32_t *)buf + j * per_sc;
        m[j].items = (pe_item *)(buf + off_items) + j * item_count(n_in);
        m[j].extra = (float *)(buf + off_extra[j]);
    }
    return PE_OK;
}

pe_status pe_bucketmul_group(int n, const pe_packed *const *ps, const pe_buckets *const *bs,
                             const float *x, const double *efforts, float *const *ys,
                             int64_t *mults, int64_t *bytes) {
    if (n < 1 || n > PE_MAX_GROUP) return PE_ERR_ARG;
    for (int j = 0; j < n; j++)
        if (bs[j]->n_rows != ps[j]->n_slots || bs[j]->n_in != ps[j]->n_in ||
            bs[j]->n_out != ps[j]->n_out || ps[j]->n_in != ps[0]->n_in)
            return PE_ERR_ARG;
    int nt = pe_num_threads(); /* once: the jobs are sized and run with it */
    if (nt < 2) { /* nothing to overlap, and one call's scratch stays in cache */
        for (int j = 0; j < n; j++) {
            pe_status st =
                pe_bucketmul(ps[j], bs[j], x, 1, efforts[j], ys[j], mults + j, bytes + j);
            if (st != PE_OK) return st;
        }
        return PE_OK;
    }
    group_member m[PE_MAX_GROUP];
    if (group_scratch(n, ps, m) != PE_OK) return PE_ERR_ALLOC;
    for (int j = 0; j < n; j++) {
        m[j].p = ps[j];
        m[j].b = bs[j];
        m[j].effort = efforts[j];
        m[j].y = ys[j];
        atomic_init(&m[j].ready, 0);
    }
    group_job g = {m, x, n, KERNEL_CHUNKS * nt + PE_KERNEL_MAX_PARTS, nt}; /* >= parts * ranges */
    pe_status st = pe_parallel(group_chunk, &g, n + n * g.per, nt);
    if (st != PE_OK) return st;
    for (int j = 0; j < n; j++) {
        if (m[j].st != PE_OK) return m[j].st;
        if ((st = add_parts(&m[j].job, nt)) != PE_OK) return st;
        mults[j] += m[j].done;
        bytes[j] += selection_bytes(ps[j], m[j].items, m[j].begin, m[j].end, m[j].n_rows);
    }
    return PE_OK;
}

/* ---------------------------------------------------------------- dense */

/* The dense products (fp16, Q8_0) cut W's rows into parts fixed by the shape alone, each summed
 * into its own output and the parts added in order (so any thread count gives the same bits),
 * and each part's columns into as many ranges as the threads need: a chunk streams whole row
 * segments of one part, a long contiguous run of W. (Splitting the columns alone gave each of
 * 16 threads 1.8 KB of every one of W's rows: short streams that the prefetchers restart, and
 * no chunk to spare for a thread that starts late.) */
#define DENSE_PART_ROWS 256   /* rows per part at least; a multiple of PE_Q8_BLOCK        */
#define DENSE_MAX_PARTS 32    /* partial outputs: 4 bytes per part and output, twice      */
#define DENSE_CHUNKS 2        /* chunks per thread: slack for one that starts late        */
/* bytes of W below which one thread does it all: a matrix that small is in cache when a
 * benchmark repeats it, and a second thread's hand-off costs about what it saves (256 KB
 * tried on 2 Zen 4 cores: 576x1536 fp16 0.044 -> 0.10 ms, numpy's spinning threads beside) */
#define DENSE_THREADED (4 << 20)

typedef struct {
    const pe_kernel_set *set;
    const float *x;
    const void *w;            /* fp16 bits, or int8 when scales      */
    const uint16_t *scales;   /* Q8_0 scales, or NULL for fp16        */
    const int32_t *rows;      /* fp16: the inputs summed, or NULL     */
    int64_t n_out, used, part_rows;
    int parts, ranges, reducers;
    float *y, *extra; /* part 0 -> y, part p > 0 -> extra + (p - 1) n_out */
} dense_job;

/* Rows of a part: DENSE_PART_ROWS or more, whole Q8_0 blocks, at most DENSE_MAX_PARTS parts. */
static int64_t dense_part_rows(int64_t used) {
    int64_t r = (used + DENSE_MAX_PARTS - 1) / DENSE_MAX_PARTS;
    r = (r + PE_Q8_BLOCK - 1) / PE_Q8_BLOCK * PE_Q8_BLOCK;
    return r < DENSE_PART_ROWS ? DENSE_PART_ROWS : r;
}

/* Chunk c: part c / ranges, column range c % ranges. */
static void dense_run(void *ctx, int c, int n) {
    dense_job *j = ctx;
    int part = c / j->ranges;
    int64_t j0, j1, r0 = part * j->part_rows, r1 = r0 + j->part_rows;
    (void)n;
    if (r1 > j->used) r1 = j->used;
    split(j->n_out, 64, c % j->ranges, j->ranges, &j0, &j1);
    float *y = part ? j->extra + (part - 1) * j->n_out : j->y;
    if (j1 <= j0) return;
    if (j->scales)
        j->set->dense_q8(j->x, j->w, j->scales, j->n_out, r0, r1, j0, j1, y);
    else
        j->set->dense(j->x, j->w, j->n_out, j->rows, r0, r1, j0, j1, y);
}

/* Columns t of n of the dense job: its parts added. */
static void dense_reduce(void *ctx, int t, int n) {
    dense_job *j = ctx;
    add_partials(j->y, j->extra, j->n_out, j->parts, t, n);
}

/* The job for used rows of W (bpw bytes per weight) on at most nt threads: its parts, ranges,
 * the partials' scratch; returns the threads it runs on (0: out of memory). */
static int dense_plan(dense_job *j, int64_t used, double bpw, int nt) {
    j->used = used;
    j->part_rows = dense_part_rows(used);
    j->parts = (int)((used + j->part_rows - 1) / j->part_rows);
    j->extra = scratch(sizeof(float) * (size_t)((j->parts - 1) * j->n_out + 1), 3);
    if (!j->extra) return 0;
    int64_t col_units = (j->n_out + 63) / 64, want;
    if (bpw * (double)used * (double)j->n_out < DENSE_THREADED) nt = 1;
    want = nt > 1 ? ((int64_t)DENSE_CHUNKS * nt + j->parts - 1) / j->parts : 1;
    j->ranges = (int)(want < col_units ? want : col_units);
    if (nt > j->parts * j->ranges) nt = j->parts * j->ranges;
    j->reducers = nt < col_units ? nt : (int)col_units;
    return nt;
}

/* Runs the job for each of n_tokens tokens (x, y advance by n_in, n_out). */
static pe_status dense_tokens(dense_job *j, int64_t n_tokens, int64_t n_in, int nt) {
    float *y = j->y;
    const float *x = j->x;
    for (int64_t t = 0; t < n_tokens; t++) {
        j->x = x + t * n_in;
        j->y = y + t * j->n_out;
        pe_status st = pe_parallel(dense_run, j, j->parts * j->ranges, nt);
        if (st == PE_OK && j->parts > 1) st = pe_parallel(dense_reduce, j, j->reducers, nt);
        if (st != PE_OK) return st;
    }
    return PE_OK;
}

pe_status pe_dense_rows_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                            int64_t n_out, const int32_t *rows, int64_t n_rows, float *y) {
    int64_t used = rows ? n_rows : n_in;
    for (int64_t i = 0; rows && i < n_rows; i++)
        if (rows[i] < 0 || rows[i] >= n_in) return PE_ERR_ARG;
    if (used == 0) { /* no input: the empty sum */
        memset(y, 0, sizeof(float) * (size_t)(n_tokens * n_out));
        return PE_OK;
    }
    dense_job j = {.set = pe_active_set(), .x = x, .w = w, .rows = rows, .n_out = n_out, .y = y};
    int nt = dense_plan(&j, used, 2.0, pe_num_threads());
    return nt ? dense_tokens(&j, n_tokens, n_in, nt) : PE_ERR_ALLOC;
}

pe_status pe_dense_f16(const float *x, const uint16_t *w, int64_t n_tokens, int64_t n_in,
                       int64_t n_out, float *y) {
    return pe_dense_rows_f16(x, w, n_tokens, n_in, n_out, NULL, n_in, y);
}

pe_status pe_dense_q8(const float *x, const int8_t *q, const uint16_t *scales, int64_t n_tokens,
                      int64_t n_in, int64_t n_out, float *y) {
    if (n_in < 1 || !scales) return PE_ERR_ARG;
    dense_job j = {.set = pe_active_set(), .x = x, .w = q, .scales = scales, .n_out = n_out,
                   .y = y};
    int nt = dense_plan(&j, n_in, 1.0 + 2.0 / PE_Q8_BLOCK, pe_num_threads());
    return nt ? dense_tokens(&j, n_tokens, n_in, nt) : PE_ERR_ALLOC;
}
