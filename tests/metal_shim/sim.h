// The threadgroup simulator behind the shim (include/metal_stdlib): a launch runs every
// threadgroup of a grid, one after the other, each as one real std::thread per Metal thread;
// the threads meet at real barriers, and the simdgroup functions are built on a barrier of the
// simdgroup's 32 threads. A fault is a message on stderr and abort(): a barrier or simdgroup
// function that not every thread of its group reaches at the same place, a wait of seconds.
#pragma once
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sim {

[[noreturn]] inline void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fputs("metal sim: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
    std::fflush(stderr);
    std::abort();
}

// n threads meet; each names the source line it waits at, and all must name the same one.
// A thread that has left the kernel never comes: waiting for it is a fault, not a hang.
class Barrier {
  public:
    explicit Barrier(unsigned n) : n_(n) {}
    void wait(int line, const char *what) {
        std::unique_lock<std::mutex> lk(m_);
        if (left_) fail("%s at line %d: a thread of the group has returned", what, line);
        if (waiting_ == 0) line_ = line;
        else if (line_ != line) fail("%s reached at lines %d and %d by one group", what, line_, line);
        if (++waiting_ == n_) {
            waiting_ = 0;
            ++gen_;
            cv_.notify_all();
            return;
        }
        const unsigned gen = gen_;
        if (!cv_.wait_for(lk, std::chrono::seconds(30), [&] { return gen_ != gen || left_; }))
            fail("%s at line %d: not every thread came within 30 s", what, line);
        if (gen_ == gen) fail("%s at line %d: a thread of the group has returned", what, line);
    }
    void leave() { // a thread returned from the kernel
        std::lock_guard<std::mutex> lk(m_);
        ++left_;
        if (waiting_) fail("a thread returned while others wait at line %d", line_);
        cv_.notify_all();
    }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    const unsigned n_;
    unsigned waiting_ = 0, gen_ = 0, left_ = 0;
    int line_ = -1;
};

struct Simdgroup {
    Barrier bar{32};
    uint64_t slot[2][32] = {}; // by the parity of the lane's count of exchanges
};

struct Threadgroup {
    explicit Threadgroup(unsigned n) : bar(n) {
        for (unsigned s = 0; s < n / 32; s++) sgs.emplace_back(new Simdgroup);
    }
    Barrier bar;
    std::vector<std::unique_ptr<Simdgroup>> sgs;
};

struct Ctx {
    Threadgroup *tg = nullptr;
    unsigned lane = 0, sg = 0, exchanges = 0;
};
inline thread_local Ctx ctx;

// Every lane's value of v, once all 32 lanes of the simdgroup have given theirs. Exchanges
// alternate between two slot sets: a lane writes set k % 2 again only at exchange k + 2, after
// every lane has reached exchange k + 1, so after every lane has read exchange k.
template <typename T> std::array<T, 32> exchange(T v, int line) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "simdgroup values are scalars");
    Simdgroup &s = *ctx.tg->sgs[ctx.sg];
    uint64_t *slot = s.slot[ctx.exchanges++ % 2];
    std::memcpy(&slot[ctx.lane], &v, sizeof v);
    s.bar.wait(line, "a simdgroup function");
    std::array<T, 32> all;
    for (unsigned l = 0; l < 32; l++) std::memcpy(&all[l], &slot[l], sizeof(T));
    return all;
}

struct Ids {
    unsigned tg[3];  // threadgroup_position_in_grid
    unsigned tid;    // thread_index_in_threadgroup
    unsigned nt;     // threads_per_threadgroup
    unsigned lane;   // thread_index_in_simdgroup
    unsigned sg;     // simdgroup_index_in_threadgroup
    unsigned global; // thread_position_in_grid (1-D grids)
};

// Runs body(ids) for every thread of a (gx, gy, gz) grid of threadgroups of nt threads
// (a multiple of 32, at most 1024). Threadgroups run one after the other: threadgroup memory
// (function-scope statics in the shim) serves one at a time, as Metal's independence of
// threadgroups allows.
template <typename F> void launch(unsigned gx, unsigned gy, unsigned gz, unsigned nt, F body) {
    if (nt == 0 || nt % 32 || nt > 1024) fail("threads per threadgroup %u: 32..1024, by 32", nt);
    const unsigned n_tg = gx * gy * gz;
    std::vector<std::unique_ptr<Threadgroup>> tgs;
    for (unsigned k = 0; k < n_tg; k++) tgs.emplace_back(new Threadgroup(nt));
    Barrier between(nt); // no thread starts threadgroup k + 1 before all have left k
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; t++)
        threads.emplace_back([&, t] {
            for (unsigned k = 0; k < n_tg; k++) {
                ctx = Ctx{tgs[k].get(), t % 32, t / 32, 0};
                const unsigned x = k % gx, y = k / gx % gy, z = k / gx / gy;
                body(Ids{{x, y, z}, t, nt, t % 32, t / 32, x * nt + t});
                tgs[k]->bar.leave();
                tgs[k]->sgs[t / 32]->bar.leave();
                between.wait(__LINE__, "the end of a threadgroup");
            }
        });
    for (auto &th : threads) th.join();
}

} // namespace sim
