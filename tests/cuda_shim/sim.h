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
#pragma once
#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
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
    va_list ap;
    va_start(ap, fmt);
    std::fputs("cuda sim: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
    std::fflush(stderr);
    std::abort();
}

inline const char *base(const char *path) {
    const char *s = std::strrchr(path, '/');
    return s ? s + 1 : path;
}

enum class Wait : uint8_t { none, block, warp, done };

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
};

struct Group { // a barrier: the block's, or a warp's (with the exchanged values)
    unsigned arrived = 0, gen = 0, done = 0;
    Site at{"", 0};
    const char *what = "";
    unsigned acc = 0, result[2] = {0, 0}; // __syncthreads_count/_or
    uint64_t slot[2][32] = {};            // warp functions' values, by generation parity
};

constexpr size_t STACK = 256 * 1024;

struct Block {
    unsigned id = 0, nt = 0, cur = 0, n_done = 0;
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
        default: return false;
    }
}

[[noreturn]] inline void stuck(Block &b);

// The next fiber that can run after the running one (itself last, if `self`) -> switch to it.
inline void schedule(bool self) {
    Block &b = *blk;
    for (unsigned k = 1; k <= b.nt; k++) {
        const unsigned i = b.order[(b.place[b.cur] + k) % b.nt];
        if (i == b.cur && !self) break;
        if (runnable(b, i)) {
            b.f[i].wait = Wait::none;
            if (i != b.cur) switch_to(i);
            return;
        }
    }
    stuck(b);
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
        const char *st = f.wait == Wait::block ? "wait at the block barrier"
                         : f.wait == Wait::warp ? "wait at a warp function"
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
    me.wait = Wait::done;
    b.bar.done++;
    w.done++;
    if (++b.n_done == b.nt) switch_to(b.nt, true);
    for (unsigned k = 1; k < b.nt; k++) { // the next that can run, or a deadlock
        const unsigned i = b.order[(b.place[b.cur] + k) % b.nt];
        if (runnable(b, i)) {
            b.f[i].wait = Wait::none;
            switch_to(i, true);
        }
    }
    stuck(b);
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

// One block: nt fibers on this OS thread, until all have returned.
inline void run_block(unsigned id, dim3 grid, unsigned nt, size_t dyn_smem,
                      const std::function<void()> &body) {
    Block b;
    b.id = id;
    b.nt = nt;
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

// Runs body() as every thread of a grid of 1-D blocks, all blocks at once. A grid that has not
// finished within the timeout is a deadlock: where each block waits, then abort().
inline void launch(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()> &body) {
    const unsigned nb = grid.x * grid.y * grid.z, nt = block.x;
    if (block.y != 1 || block.z != 1) fail("only 1-D blocks are simulated");
    if (nt == 0 || nt % 32 || nt > 1024) fail("threads per block %u: 32..1024, by 32", nt);
    if (dyn_smem > SIM_SMEM_MAX) fail("dynamic shared memory %zu > %d", dyn_smem, SIM_SMEM_MAX);
    std::mutex m;
    std::condition_variable cv;
    unsigned finished = 0;
    std::vector<std::thread> threads;
    for (unsigned id = 0; id < nb; id++)
        threads.emplace_back([&, id] {
            run_block(id, grid, nt, dyn_smem, body);
            std::lock_guard<std::mutex> lk(m);
            if (++finished == nb) cv.notify_all();
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
