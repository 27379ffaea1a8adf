/* A persistent pthread pool: workers spin briefly on a generation counter, then sleep on a
 * condition variable. A job is split into chunks that threads claim with an atomic counter, so
 * a worker the OS has not scheduled leaves its share to the others (results never depend on
 * who runs a chunk). One job at a time; a second concurrent caller runs its job inline. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define MAX_THREADS 256
#define SPIN_NS 300000 /* a worker spins this long after a job before it sleeps */

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time  */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER; /* guards the condvar */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_uint_fast64_t generation; /* bumped per job: wakes the workers                  */
static atomic_uint_fast64_t claim;      /* (job generation << 32) | next unclaimed chunk       */
static atomic_int done, n_sleeping;     /* chunks finished in the current job; sleeping workers */
typedef struct {
    pe_job_fn fn;
    void *ctx;
    int n;
} job_t;
static job_t jobs[2]; /* job g lives in jobs[g & 1]: a late worker never reads a newer job */
static int n_workers;
static uint64_t start_gen[MAX_THREADS]; /* the generation when worker i was started */


static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A warm request (pe_pool_warm): ranges an idle worker reads into the caches, in order, while
 * it waits for the next job, e.g. the statistics and copies of the matrices a decoding step
 * multiplies next, during the Python work between two calls. One request at a time, the
 * newest wins; a job or a newer request stops the reading. */
static pthread_mutex_t warm_lock = PTHREAD_MUTEX_INITIALIZER;
static pe_warm_range warm_req[PE_WARM_RANGES]; /* guarded by warm_lock                    */
static int warm_n;                             /* ranges in warm_req; guarded by warm_lock */
static atomic_int warm_pending;                /* a request (or a cancel) is waiting       */
/* the ranges worker i reads now (n_warming[i] = 0: none); guarded by warm_lock */
static pe_warm_range warming[MAX_THREADS][PE_WARM_RANGES];
static int n_warming[MAX_THREADS];

void pe_pool_warm(const pe_warm_range *ranges, int n) {
    if (n_workers < 1) return; /* no pool thread yet: nobody idle to read it */
    if (n > PE_WARM_RANGES) n = PE_WARM_RANGES;
    pthread_mutex_lock(&warm_lock);
    memcpy(warm_req, ranges, sizeof(pe_warm_range) * (size_t)n);
    warm_n = n;
    atomic_store(&warm_pending, 1);
    pthread_mutex_unlock(&warm_lock);
}

/* 1 if one of the n ranges belongs to owner. */
static int owned(const pe_warm_range *r, int n, const void *owner) {
    for (int i = 0; i < n; i++)
        if (r[i].owner == owner) return 1;
    return 0;
}

void pe_pool_unwarm(const void *owner) {
    pthread_mutex_lock(&warm_lock);
    if (owned(warm_req, warm_n, owner)) warm_n = 0;
    atomic_store(&warm_pending, 1); /* also stops a reading in progress (it sees a request) */
    for (;;) {
        int busy = 0;
        for (int i = 0; i < MAX_THREADS; i++) busy |= owned(warming[i], n_warming[i], owner);
        if (!busy) break;
        pthread_mutex_unlock(&warm_lock);
        pe_cpu_relax();
        pthread_mutex_lock(&warm_lock);
    }
    pthread_mutex_unlock(&warm_lock);
}

/* Worker id takes the pending request and reads its ranges, a load per line, until they end
 * or a job (the generation past seen) or another request comes. */
static void serve_warm(uint64_t seen, int id) {
    pthread_mutex_lock(&warm_lock);
    int n = warm_n;
    memcpy(warming[id], warm_req, sizeof(pe_warm_range) * (size_t)n);
    n_warming[id] = n; /* under the lock: pe_pool_unwarm then waits for it */
    warm_n = 0;
    atomic_store(&warm_pending, 0);
    pthread_mutex_unlock(&warm_lock);
    uint8_t sink = 0;
    int stop = 0;
    for (int r = 0; r < n && !stop; r++) {
        const volatile uint8_t *a = warming[id][r].base;
        for (size_t o = 0; o < warming[id][r].len; o += 64) {
            if ((o & 4095) == 0 &&
                (atomic_load_explicit(&generation, memory_order_relaxed) != seen ||
                 atomic_load_explicit(&warm_pending, memory_order_relaxed))) {
                stop = 1;
                break;
            }
            sink ^= a[o];
        }
    }
    (void)sink;
    pthread_mutex_lock(&warm_lock);
    n_warming[id] = 0;
    pthread_mutex_unlock(&warm_lock);
}

/* Worker id waits until the generation moves past seen (serving warm requests meanwhile);
 * returns the new one. */
static uint64_t wait_job(uint64_t seen, int id) {
    int64_t t0 = now_ns();
    for (int i = 0;; i++) {
        uint64_t g = atomic_load_explicit(&generation, memory_order_acquire);
        if (g != seen) return g;
        if (atomic_load_explicit(&warm_pending, memory_order_relaxed)) {
            serve_warm(seen, id);
            t0 = now_ns(); /* the spin restarts after the reading */
        }
        pe_cpu_relax();
        if ((i & 255) == 255 && now_ns() - t0 > SPIN_NS) break;
    }
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add(&n_sleeping, 1);
    uint64_t g;
    while ((g = atomic_load(&generation)) == seen)
        pthread_cond_wait(&wake, &wake_lock);
    atomic_fetch_sub(&n_sleeping, 1);
    pthread_mutex_unlock(&wake_lock);
    return g;
}

/* Claims and runs chunks of job g until none is left; a claim only succeeds while g is the
 * current job, so parameters read before it are that job's. */
static void run_chunks(uint64_t g) {
    job_t job = jobs[g & 1];
    uint64_t tag = (g & 0xFFFFFFFFu) << 32;
    for (;;) {
        uint64_t w = atomic_load_explicit(&claim, memory_order_acquire);
        if ((w & ~0xFFFFFFFFull) != tag || (int)(w & 0xFFFFFFFFu) >= job.n) return;
        if (!atomic_compare_exchange_weak(&claim, &w, w + 1)) continue;
        job.fn(job.ctx, (int)(w & 0xFFFFFFFFu), job.n);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = start_gen[id];
    for (;;) {
        seen = wait_job(seen, id);
        run_chunks(seen);
    }
    return NULL;
}

static void after_fork_child(void) {
    n_workers = 0; /* the workers do not exist in a forked child */
    pthread_mutex_init(&warm_lock, NULL);
    warm_n = 0;
    atomic_store(&warm_pending, 0);
    memset(n_warming, 0, sizeof n_warming);
    pthread_mutex_init(&job_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
    atomic_store(&n_sleeping, 0);
}

/* Starts workers 1..n-1 that are not running yet. */
static pe_status grow(int n) {
    static int fork_hook;
    if (!fork_hook) fork_hook = !pthread_atfork(NULL, NULL, after_fork_child);
    while (n_workers + 1 < n) {
        pthread_t th;
        start_gen[n_workers + 1] = atomic_load(&generation);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker, (void *)(intptr_t)(n_workers + 1));
        pthread_attr_destroy(&attr);
        if (err) return PE_ERR_THREAD;
        n_workers++;
    }
    return PE_OK;
}

pe_status pe_parallel(pe_job_fn fn, void *ctx, int n_chunks, int n_threads) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads <= 1 || n_chunks <= 1 || pthread_mutex_trylock(&job_lock) != 0) {
        for (int c = 0; c < n_chunks; c++) fn(ctx, c, n_chunks); /* inline: the same result */
        return PE_OK;
    }
    pe_status st = grow(n_threads);
    if (st != PE_OK) {
        pthread_mutex_unlock(&job_lock);
        return st;
    }
    uint64_t g = atomic_load(&generation) + 1;
    jobs[g & 1] = (job_t){fn, ctx, n_chunks};
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_store_explicit(&claim, (g & 0xFFFFFFFFu) << 32, memory_order_release);
    atomic_store(&generation, g); /* seq_cst: pairs with n_sleeping (Dekker) */
    if (atomic_load(&n_sleeping) > 0) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&wake_lock);
    }
    run_chunks(g); /* the caller works too, and takes every chunk no worker has claimed */
    while (atomic_load_explicit(&done, memory_order_acquire) < n_chunks) pe_cpu_relax();
    pthread_mutex_unlock(&job_lock);
    return PE_OK;
}

/* Cores this process may run on. */
int pe_default_threads(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
