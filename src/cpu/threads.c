/* A persistent pthread pool: workers spin briefly on a generation counter, then sleep on a
 * condition variable. One job at a time; a second concurrent caller runs its job inline. */
#define _GNU_SOURCE
#include <pthread.h>
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
static atomic_uint_fast64_t generation;
static atomic_int remaining, n_sleeping;
static pe_job_fn job_fn;
static void *job_ctx;
static int job_n, n_workers;
static uint64_t start_gen[MAX_THREADS]; /* the generation when worker i was started */

static void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Waits until the generation moves past seen; returns the new one. */
static uint64_t wait_job(uint64_t seen) {
    int64_t t0 = now_ns();
    for (int i = 0;; i++) {
        uint64_t g = atomic_load_explicit(&generation, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
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

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = start_gen[id];
    for (;;) {
        seen = wait_job(seen);
        if (id < job_n) job_fn(job_ctx, id, job_n);
        /* every worker acknowledges every job, so none lags into the next one's parameters */
        atomic_fetch_sub_explicit(&remaining, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_child(void) {
    n_workers = 0; /* the workers do not exist in a forked child */
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

pe_status pe_parallel(pe_job_fn fn, void *ctx, int n) {
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n <= 1 || pthread_mutex_trylock(&job_lock) != 0) {
        for (int t = 0; t < n; t++) fn(ctx, t, n); /* inline: same split, same result */
        return PE_OK;
    }
    pe_status st = grow(n);
    if (st != PE_OK) {
        pthread_mutex_unlock(&job_lock);
        return st;
    }
    job_fn = fn;
    job_ctx = ctx;
    job_n = n;
    atomic_store_explicit(&remaining, n_workers, memory_order_relaxed);
    atomic_fetch_add(&generation, 1); /* seq_cst: pairs with n_sleeping (Dekker) */
    if (atomic_load(&n_sleeping) > 0) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&wake_lock);
    }
    fn(ctx, 0, n);
    while (atomic_load_explicit(&remaining, memory_order_acquire) > 0) cpu_relax();
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
