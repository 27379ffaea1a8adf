// The grid simulator behind the CUDA shim (include/cuda_runtime.h). A launch runs every block of
// its grid at once, each on its own OS thread, so that blocks which wait for each other through
// global memory (the effort kernel's cooperative launch) meet as on a GPU with all blocks
// resident. Inside a block every CUDA thread is a fiber (ucontext) on that OS thread: block-wide
// __shared__ data is the OS thread's (thread_local), a fiber runs until it reaches a barrier or
// a warp function (or polls memory that has not changed), then the next one runs. A fault is a
// message on stderr and abort(): a barrier or warp function that not every thread of its block
// or warp reaches at the same source line, a thread that returns while others wait for it, a
// grid that has not finished within CUDA_SIM_TIMEOUT seconds (default 120: a deadlock; the
// report says where every block waits), __trap().
// Thread block clusters (1-D: `csize` consecutive blocks): the cluster barrier's two halves
// (arrive, then wait, alternately; warp-aligned, as PTX's .aligned asks) are a phase counter
// per cluster; a phase ends once every thread of the cluster that has not returned has arrived
// (as PTX's, a thread that returns no longer counts); a thread waiting there lets the others
// run until its phase has ended. Distributed shared memory: a block's dynamic shared memory as the
// other blocks of its cluster see it (Peer). Every block's OS thread, and so its shared memory,
// lives until the whole grid has ended, so that an access to the memory of a block that has
// exited is a clear fault (on a GPU that memory is gone), not a read of freed memory. Faults: a
// wait with no arrive before it, two arrives with no wait between, a DSMEM access before the
// thread's first cluster wait (the target may not have started yet) or to a block that has
// exited, a pointer outside the dynamic shared memory of the cluster's blocks.
#pragma once
#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIM_ASAN 1
#else
#define SIM_ASAN 0
#endif

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The built-in variables: the running fiber's (set at every switch) and its block's.
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

#define SIM_SMEM_MAX 232448 /* an H100's dynamic shared memory per block, at most */
// `extern __shared__ unsigned char smem[]` of the kernels: the block's dynamic shared memory.
alignas(16) inline thread_local unsigned char smem[SIM_SMEM_MAX];

namespace sim {

// A source location: as a default argument, the caller's.
struct Site {
    const char *file;
    int line;
    constexpr Site(const char *f = __builtin_FILE(), int l = __builtin_LINE()) : file(f), line(l) {}
};
#define SIM_SITE sim::Site()

[[noreturn]] inline void fail(const char *fmt, ...) {
    char msg[2048]; // one write: blocks that fail at once (other OS threads) do not interleave
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "cuda sim: %s\n", msg);
    std::fflush(stderr);
    std::abort();
}

inline const char *base(const char *path) {
    const char *s = std::strrchr(path, '/');
    return s ? s + 1 : path;
}

enum class Wait : uint8_t { none, block, warp, cluster, done };

struct Fiber {
    ucontext_t uc;
    char *stack = nullptr;
    Wait wait = Wait::none;
    unsigned gen = 0;           // the barrier generation it waits to end
    Site at{"", 0};             // where it waits
    const void *poll_addr[4] = {}; // its last polls of global memory (addr, value)
    uint64_t poll_val[4] = {};
    unsigned poll_next = 0;
    Site spin{"", 0}; // where it last polled a value that had not changed
    bool c_open = false;   // arrived at the cluster barrier (in phase c_phase), not waited yet
    unsigned c_phase = 0;
    Site c_arrive{"", 0};  // where
    bool c_synced = false; // has waited at the cluster barrier once: every block has started
};

struct Group { // a barrier: the block's, or a warp's (with the exchanged values)
    unsigned arrived = 0, gen = 0, done = 0;
    Site at{"", 0};
    const char *what = "";
    unsigned acc = 0, result[2] = {0, 0}; // __syncthreads_count/_or
    uint64_t slot[2][32] = {};            // warp functions' values, by generation parity
};

constexpr size_t STACK = 256 * 1024;

// A block as the other blocks of its cluster see it.
struct Peer {
    std::atomic<unsigned char *> smem{nullptr}; // its dynamic shared memory, once started
    std::atomic<bool> exited{false};            // its last thread has returned
};
struct Cluster { // the cluster barrier
    std::mutex m;
    unsigned live = 0, pending = 0;   // threads not returned; of those, not arrived in the phase
    std::atomic<unsigned> phase{0};   // ends (+1) when pending reaches 0
    void count_down() { // under m
        if (--pending == 0) {
            pending = live;
            phase.fetch_add(1, std::memory_order_release);
        }
    }
};
// A launch: its blocks and clusters (csize consecutive blocks each).
struct Grid {
    unsigned csize, c_threads; // blocks and threads per cluster
    size_t dyn_smem;
    std::vector<Peer> peers;
    std::vector<Cluster> clusters;
    Grid(unsigned nb, unsigned nt, unsigned cs, size_t dyn)
        : csize(cs), c_threads(cs * nt), dyn_smem(dyn), peers(nb), clusters(nb / cs) {
        for (Cluster &c : clusters) c.live = c.pending = c_threads;
    }
};

struct Block {
    unsigned id = 0, nt = 0, cur = 0, n_done = 0;
    Grid *grid = nullptr;
    Cluster *cl = nullptr; // its cluster's barrier
    unsigned rank = 0;     // in its cluster
    std::vector<Fiber> f;
    std::vector<unsigned> order, place; // the threads in the order they take turns; its inverse
    Group bar;
    std::vector<Group> warps;
    const std::function<void()> *body = nullptr;
    ucontext_t main_uc;
    const void *main_bottom = nullptr;
    size_t main_size = 0;
};

inline thread_local Block *blk = nullptr;

// ------------------------------------------------------------ fiber switches
inline void enter(unsigned next) {
    blk->cur = next;
    threadIdx = uint3{next, 0, 0};
}

// Runs fiber `next` (or the block's OS thread when next == nt), the running one suspended
// (or gone, when dying).
__attribute__((noinline)) inline void switch_to(unsigned next, bool dying = false) {
    Block &b = *blk;
    ucontext_t *from = b.cur < b.nt ? &b.f[b.cur].uc : &b.main_uc;
    ucontext_t *to = next < b.nt ? &b.f[next].uc : &b.main_uc;
#if SIM_ASAN
    void *fake = nullptr;
    void **save = dying ? nullptr : &fake;
    if (next < b.nt) __sanitizer_start_switch_fiber(save, b.f[next].stack, STACK);
    else __sanitizer_start_switch_fiber(save, b.main_bottom, b.main_size);
#endif
    enter(next);
    if (dying) {
        setcontext(to);
        fail("setcontext failed");
    }
    swapcontext(from, to);
#if SIM_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline bool runnable(Block &b, unsigned i) {
    Fiber &f = b.f[i];
    switch (f.wait) {
        case Wait::none: return true;
        case Wait::block: return b.bar.gen != f.gen;
        case Wait::warp: return b.warps[i / 32].gen != f.gen;
        case Wait::cluster: return b.cl->phase.load(std::memory_order_acquire) != f.gen;
        default: return false;
    }
}

[[noreturn]] inline void stuck(Block &b);

// The next fiber that can run after the running one (itself last, if `self`). While none can
// but some wait at the cluster barrier (for other blocks: other OS threads), yield the CPU and
// look again; none at all: a deadlock.
inline unsigned pick(Block &b, bool self) {
    for (;;) {
        bool cluster = false;
        for (unsigned k = 1; k <= b.nt; k++) {
            const unsigned i = b.order[(b.place[b.cur] + k) % b.nt];
            if (i == b.cur && !self) break;
            if (runnable(b, i)) {
                b.f[i].wait = Wait::none;
                return i;
            }
            cluster |= b.f[i].wait == Wait::cluster;
        }
        if (!cluster) stuck(b);
        sched_yield();
    }
}

// Switches to the next fiber that can run (itself last, if `self`).
inline void schedule(bool self) {
    const unsigned i = pick(*blk, self);
    if (i != blk->cur) switch_to(i);
}

inline void describe(Block &b, FILE *out) {
    std::fprintf(out, "  block %u: %u of %u threads returned\n", b.id, b.n_done, b.nt);
    for (unsigned i = 0; i < b.nt; i++) {
        const Fiber &f = b.f[i];
        if (f.wait == Wait::done) continue;
        unsigned j = i; // a run of threads in the same state: one line
        while (j + 1 < b.nt && b.f[j + 1].wait == f.wait && b.f[j + 1].at.line == f.at.line &&
               b.f[j + 1].spin.line == f.spin.line)
            j++;
        const char *st = f.wait == Wait::block     ? "wait at the block barrier"
                         : f.wait == Wait::warp    ? "wait at a warp function"
                         : f.wait == Wait::cluster ? "wait at the cluster barrier"
                                                   : "run";
        std::fprintf(out, "    threads %u..%u %s", i, j, st);
        if (f.wait != Wait::none) std::fprintf(out, " at %s:%d", base(f.at.file), f.at.line);
        if (f.spin.line)
            std::fprintf(out, " (last polled unchanged memory at %s:%d)", base(f.spin.file),
                         f.spin.line);
        std::fputc('\n', out);
        i = j;
    }
}

[[noreturn]] inline void stuck(Block &b) {
    std::fprintf(stderr, "cuda sim: block %u: no thread can go on (a barrier that not every "
                         "thread reaches)\n", b.id);
    describe(b, stderr);
    fail("deadlock in block %u", b.id);
}

// ------------------------------------------------------------ barriers and warp functions
// Threads of the group meet: each names its source line, and all must name the same one.
// -> the generation this thread waited in.
inline unsigned arrive(Group &g, unsigned n, Site s, const char *what, uint64_t value,
                       unsigned lane, Wait kind) {
    Block &b = *blk;
    if (g.done)
        fail("%s at %s:%d (block %u, thread %u): a thread of its %s has returned", what,
             base(s.file), s.line, b.id, b.cur, kind == Wait::block ? "block" : "warp");
    if (g.arrived == 0) {
        g.at = s;
        g.what = what;
    } else if (g.at.line != s.line || std::strcmp(g.at.file, s.file) != 0 ||
               std::strcmp(g.what, what) != 0) {
        fail("block %u, thread %u: %s at %s:%d while its %s waits in %s at %s:%d", b.id, b.cur,
             what, base(s.file), s.line, kind == Wait::block ? "block" : "warp", g.what,
             base(g.at.file), g.at.line);
    }
    const unsigned gen = g.gen;
    g.slot[gen & 1][lane] = value;
    g.acc += value != 0;
    if (++g.arrived == n) {
        g.result[gen & 1] = g.acc;
        g.acc = 0;
        g.arrived = 0;
        g.gen++;
        return gen;
    }
    Fiber &me = b.f[b.cur];
    me.wait = kind;
    me.gen = gen;
    me.at = s;
    schedule(false);
    return gen;
}

// __syncthreads_count: every thread of the block, -> the number with pred != 0.
inline unsigned sync_block(bool pred, Site s, const char *what) {
    Group &g = blk->bar;
    return g.result[arrive(g, blk->nt, s, what, pred, 0, Wait::block) & 1];
}

// Every lane's value (as 64 bits) once all 32 lanes of the warp have given theirs.
inline const uint64_t *exchange(uint64_t v, unsigned mask, Site s, const char *what) {
    if (mask != 0xFFFFFFFFu)
        fail("%s at %s:%d: only full-warp masks are simulated", what, base(s.file), s.line);
    Group &w = blk->warps[blk->cur / 32];
    return w.slot[arrive(w, 32, s, what, v, blk->cur % 32, Wait::warp) & 1];
}

// A thread read global memory at addr: if it read the same value there lately, it is polling;
// let the other threads of the block and the other blocks run.
inline void poll(const void *addr, uint64_t value, Site s) {
    Fiber &f = blk->f[blk->cur];
    for (unsigned k = 0; k < 4; k++) {
        if (f.poll_addr[k] == addr && f.poll_val[k] == value) {
            f.spin = s;
            sched_yield();
            schedule(true);
            return;
        }
    }
    f.poll_addr[f.poll_next] = addr;
    f.poll_val[f.poll_next] = value;
    f.poll_next = (f.poll_next + 1) % 4;
}

// ------------------------------------------------------------ thread block clusters
// barrier.cluster.arrive(.relaxed): this thread's arrival in its cluster's current phase (the
// last of the cluster's threads to arrive ends the phase). Release or relaxed: the same here.
inline void cluster_arrive(Site s, const char *what) {
    Block &b = *blk;
    Fiber &me = b.f[b.cur];
    if (me.c_open)
        fail("%s at %s:%d (block %u, thread %u): a second arrive with no pe_cluster_wait since "
             "the one at %s:%d", what, base(s.file), s.line, b.id, b.cur, base(me.c_arrive.file),
             me.c_arrive.line);
    exchange(0, 0xFFFFFFFFu, s, what); // .aligned: the whole warp at this line, none returned
    Cluster &c = *b.cl;
    std::lock_guard<std::mutex> lk(c.m);
    me.c_phase = c.phase.load(std::memory_order_relaxed);
    c.count_down();
    me.c_open = true;
    me.c_arrive = s;
}

// barrier.cluster.wait: until the phase of this thread's arrive has ended (every thread of the
// cluster has arrived); the others run meanwhile.
inline void cluster_wait(Site s) {
    Block &b = *blk;
    Fiber &me = b.f[b.cur];
    if (!me.c_open)
        fail("pe_cluster_wait at %s:%d (block %u, thread %u): no pe_cluster_arrive before it (the "
             "barrier's halves alternate: arrive, then wait)", base(s.file), s.line, b.id, b.cur);
    exchange(0, 0xFFFFFFFFu, s, "pe_cluster_wait");
    if (b.cl->phase.load(std::memory_order_acquire) == me.c_phase) {
        me.wait = Wait::cluster;
        me.gen = me.c_phase;
        me.at = s;
        schedule(true); // back here once the phase has ended (runnable)
    }
    me.c_open = false;
    me.c_synced = true;
}

// A thread returns: its cluster's barrier no longer waits for it.
inline void cluster_leave(Fiber &me) {
    Cluster &c = *blk->cl;
    std::lock_guard<std::mutex> lk(c.m);
    c.live--;
    if (!me.c_open || me.c_phase != c.phase.load(std::memory_order_relaxed)) c.count_down();
}

// mapa: p, in this block's dynamic shared memory -> the same place in block `rank` of its cluster.
inline void *cluster_map(const void *p, unsigned rank, Site s) {
    Block &b = *blk;
    const Grid &g = *b.grid;
    const unsigned char *c = static_cast<const unsigned char *>(p);
    if (c < smem || c >= smem + g.dyn_smem)
        fail("pe_cluster_map at %s:%d (block %u, thread %u): %p is not in this block's dynamic "
             "shared memory (%zu bytes at %p; the simulator maps only extern __shared__ smem[], "
             "no static __shared__ variable)", base(s.file), s.line, b.id, b.cur, p, g.dyn_smem,
             (void *)smem);
    if (rank >= g.csize)
        fail("pe_cluster_map at %s:%d (block %u, thread %u): rank %u in a cluster of %u blocks",
             base(s.file), s.line, b.id, b.cur, rank, g.csize);
    const Peer &q = g.peers[b.id - b.rank + rank];
    unsigned char *m;
    while (!(m = q.smem.load(std::memory_order_acquire))) sched_yield(); // its thread starts
    return m + (c - smem);
}

// A distributed shared memory access `what` of n bytes at p (from cluster_map), checked: inside
// the dynamic shared memory of a block of this cluster that has not exited, after this thread's
// first cluster wait unless it is its own block's.
inline void dsm_check(const void *p, size_t n, Site s, const char *what) {
    Block &b = *blk;
    const Grid &g = *b.grid;
    const unsigned first = b.id - b.rank;
    const unsigned char *c = static_cast<const unsigned char *>(p);
    for (unsigned r = 0; r < g.csize; r++) {
        const Peer &q = g.peers[first + r];
        const unsigned char *m = q.smem.load(std::memory_order_acquire);
        if (!m || c < m || c + n > m + g.dyn_smem) continue;
        if (r != b.rank && !b.f[b.cur].c_synced)
            fail("%s at %s:%d (block %u, thread %u): block %u's shared memory before this "
                 "thread's first pe_cluster_wait (that block may not have started yet)", what,
                 base(s.file), s.line, b.id, b.cur, first + r);
        if (q.exited.load(std::memory_order_acquire))
            fail("%s at %s:%d (block %u, thread %u): block %u (rank %u of this cluster) has "
                 "exited: its shared memory is gone (a cluster barrier before the end keeps it)",
                 what, base(s.file), s.line, b.id, b.cur, first + r, r);
        return;
    }
    fail("%s at %s:%d (block %u, thread %u): %p is not in the dynamic shared memory of a block "
         "of this cluster (blocks %u..%u; a pointer from pe_cluster_map?)", what, base(s.file),
         s.line, b.id, b.cur, p, first, first + g.csize - 1);
}

// ------------------------------------------------------------ blocks and grids
inline void fiber_main() {
    Block &b = *blk;
#if SIM_ASAN
    const void *bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
    if (!b.main_bottom) b.main_bottom = bottom, b.main_size = size; // the first: from the thread
#endif
    (*b.body)();
    Fiber &me = b.f[b.cur];
    if (b.bar.arrived)
        fail("block %u, thread %u returned while others wait in %s at %s:%d", b.id, b.cur,
             b.bar.what, base(b.bar.at.file), b.bar.at.line);
    Group &w = b.warps[b.cur / 32];
    if (w.arrived)
        fail("block %u, thread %u returned while its warp waits in %s at %s:%d", b.id, b.cur,
             w.what, base(w.at.file), w.at.line);
    cluster_leave(me);
    me.wait = Wait::done;
    b.bar.done++;
    w.done++;
    if (++b.n_done == b.nt) {
        b.grid->peers[b.id].exited.store(true, std::memory_order_release);
        switch_to(b.nt, true);
    }
    switch_to(pick(b, false), true); // the next that can run, or a deadlock
}

// A fiber that starts in fiber_main on a stack of its own.
__attribute__((noinline)) inline void make_fiber(Fiber &f) {
    f.stack = static_cast<char *>(mmap(nullptr, STACK, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = STACK;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
}

inline std::mutex g_live_m;
inline std::vector<Block *> g_live; // blocks running (for the report of a timeout)

// The order in which b's threads take turns (CUDA_SIM_ORDER): "forward" (0, 1, ...: the
// default), "reverse", or "random:SEED" (a permutation per block). Between two barriers a
// thread runs until it meets one, so a kernel whose result depends on this order (a missing
// barrier, a race on shared memory) gives other bits under another order.
inline void turns(Block &b) {
    const char *env = std::getenv("CUDA_SIM_ORDER");
    const std::string how = env ? env : "forward";
    b.order.resize(b.nt);
    for (unsigned i = 0; i < b.nt; i++) b.order[i] = how == "reverse" ? b.nt - 1 - i : i;
    if (how.rfind("random:", 0) == 0) {
        std::mt19937 gen(std::stoul(how.substr(7)) * 1000003u + b.id);
        std::shuffle(b.order.begin(), b.order.end(), gen);
    } else if (how != "forward" && how != "reverse") {
        fail("CUDA_SIM_ORDER=%s: forward, reverse or random:SEED", how.c_str());
    }
    b.place.resize(b.nt);
    for (unsigned k = 0; k < b.nt; k++) b.place[b.order[k]] = k;
}

// One block of grid g: nt fibers on this OS thread, until all have returned.
inline void run_block(unsigned id, Grid &g, dim3 grid, unsigned nt,
                      const std::function<void()> &body) {
    const size_t dyn_smem = g.dyn_smem;
    Block b;
    b.id = id;
    b.nt = nt;
    b.grid = &g;
    b.cl = &g.clusters[id / g.csize];
    b.rank = id % g.csize;
    b.f.resize(nt);
    b.warps.resize(nt / 32);
    b.body = &body;
    blk = &b;
    blockIdx = uint3{id % grid.x, id / grid.x % grid.y, id / grid.x / grid.y};
    blockDim = dim3(nt);
    gridDim = grid;
    std::memset(smem, 0xFF, dyn_smem); // uninitialised, as on the device: NaNs, -1s
#if SIM_ASAN
    ASAN_POISON_MEMORY_REGION(smem + dyn_smem, SIM_SMEM_MAX - dyn_smem);
#endif
    g.peers[id].smem.store(smem, std::memory_order_release);
    for (Fiber &f : b.f) make_fiber(f);
    {
        std::lock_guard<std::mutex> lk(g_live_m);
        g_live.push_back(&b);
    }
    turns(b);
    b.cur = nt; // the OS thread
    switch_to(b.order[0]);
    {
        std::lock_guard<std::mutex> lk(g_live_m);
        for (size_t k = 0; k < g_live.size(); k++)
            if (g_live[k] == &b) g_live.erase(g_live.begin() + k);
    }
#if SIM_ASAN
    ASAN_UNPOISON_MEMORY_REGION(smem, SIM_SMEM_MAX);
#endif
    for (Fiber &f : b.f) { // the frames a fiber left (it never unwinds) poison no later mapping
#if SIM_ASAN
        ASAN_UNPOISON_MEMORY_REGION(f.stack, STACK);
#endif
        munmap(f.stack, STACK);
    }
    blk = nullptr;
}

inline double timeout_s() {
    const char *s = std::getenv("CUDA_SIM_TIMEOUT");
    return s ? std::atof(s) : 120.0;
}

// Runs body() as every thread of a grid of 1-D blocks in clusters of `cluster` consecutive
// blocks, all blocks at once. A grid that has not finished within the timeout is a deadlock:
// where each block waits, then abort().
inline void launch(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()> &body,
                   unsigned cluster = 1) {
    const unsigned nb = grid.x * grid.y * grid.z, nt = block.x;
    if (block.y != 1 || block.z != 1) fail("only 1-D blocks are simulated");
    if (nt == 0 || nt % 32 || nt > 1024) fail("threads per block %u: 32..1024, by 32", nt);
    if (dyn_smem > SIM_SMEM_MAX) fail("dynamic shared memory %zu > %d", dyn_smem, SIM_SMEM_MAX);
    if (cluster == 0 || grid.x % cluster) fail("clusters of %u blocks in %u", cluster, grid.x);
    Grid g(nb, nt, cluster, dyn_smem);
    std::mutex m;
    std::condition_variable cv;
    unsigned finished = 0;
    std::vector<std::thread> threads;
    for (unsigned id = 0; id < nb; id++)
        threads.emplace_back([&, id] {
            run_block(id, g, grid, nt, body);
            std::unique_lock<std::mutex> lk(m);
            if (++finished == nb) cv.notify_all();
            // this thread's shared memory stays until the grid ends: a late access to it from
            // another block of its cluster finds it exited, not freed
            cv.wait(lk, [&] { return finished == nb; });
        });
    {
        std::unique_lock<std::mutex> lk(m);
        const auto limit = std::chrono::duration<double>(timeout_s());
        if (!cv.wait_for(lk, limit, [&] { return finished == nb; })) {
            std::lock_guard<std::mutex> lv(g_live_m);
            std::fprintf(stderr, "cuda sim: the grid (%u blocks of %u threads) has not finished "
                         "in %.0f s: a deadlock? %u blocks still run:\n", nb, nt, timeout_s(),
                         nb - finished);
            for (Block *b : g_live) describe(*b, stderr);
            fail("timeout");
        }
    }
    for (auto &t : threads) t.join();
}

} // namespace sim
