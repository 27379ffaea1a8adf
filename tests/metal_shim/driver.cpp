// The shim's driver: runs src/metal's kernels on the simulator (sim.h) with the grids the host
// (src/metal/pe_metal.mm) launches, on buffers read from DIR/<name>.bin; writes its outputs to
// DIR/<name>.bin. Built with AddressSanitizer by tests/test_metal_shim.py.
//   driver effort DIR X V Y n_in n_out n_rows n_tok effort splits select_threads
//       in: x, values, positions, stats, order (V = q8: scales, srow)  out: rows, info, y
//   driver dense DIR X Y n_in n_out n_tok splits        in: x, w  out: y
//   driver fault DIR NAME                               faults.metal's kernel NAME
// X, Y: f32 | f16 (activations, outputs); V: f16 | q8 (bucket values).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include <metal_stdlib>

#include "pe_metal_host.h"
#include "select.metal"
#include "bucketmul.metal"
#include "dense.metal"
#include "reduce.metal"
#include "faults.metal"
#undef kernel
#undef device
#undef constant
#undef thread
#undef threadgroup

namespace {

// A buffer: one heap block of exactly its size (ASan: no byte past it is addressable).
struct Buffer {
    std::unique_ptr<uint8_t[]> p;
    size_t n = 0;
    explicit Buffer(size_t bytes) : p(new uint8_t[bytes]), n(bytes) {}
    template <typename T> T *as() { return reinterpret_cast<T *>(p.get()); }
};

std::string g_dir;

Buffer load(const char *name) {
    const std::string path = g_dir + "/" + name + ".bin";
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) sim::fail("cannot open %s", path.c_str());
    std::fseek(f, 0, SEEK_END);
    const long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    Buffer b(static_cast<size_t>(n));
    if (n && std::fread(b.p.get(), 1, b.n, f) != b.n) sim::fail("cannot read %s", path.c_str());
    std::fclose(f);
    return b;
}

void save(const char *name, const Buffer &b) {
    const std::string path = g_dir + "/" + name + ".bin";
    FILE *f = std::fopen(path.c_str(), "wb");
    if (!f || (b.n && std::fwrite(b.p.get(), 1, b.n, f) != b.n)) sim::fail("cannot write %s", path.c_str());
    std::fclose(f);
}

uint arg_u(const char *s) { return static_cast<uint>(std::strtoul(s, nullptr, 10)); }

template <typename Y> void reduce(const pe_metal_params &p, Buffer &partial, Buffer &y) {
    sim::launch(pe_metal_reduce_groups(&p), 1, 1, PE_REDUCE_THREADS, [&](const sim::Ids &t) {
        kernel_reduce<Y>(partial.as<float>(), y.as<Y>(), p, t.global);
    });
}

// kernel_select, then kernel_bucketmul_{f16,q8} on its rows, then kernel_reduce: one command
// buffer of the host.
template <typename X, typename Y>
void effort(bool q8, const pe_metal_params &p, uint select_threads) {
    Buffer x = load("x"), values = load("values"), positions = load("positions");
    Buffer stats = load("stats"), order = load("order");
    Buffer keys(4ull * p.n_tok * p.n_rows), rows(4ull * p.n_tok * p.n_rows);
    Buffer info(4ull * PE_INFO_WORDS * p.n_tok);
    Buffer partial(4ull * p.n_tok * p.n_splits * p.n_out), y(sizeof(Y) * p.n_tok * p.n_out);
    sim::launch(p.n_tok, 1, 1, select_threads, [&](const sim::Ids &t) {
        kernel_select<X>(x.as<X>(), stats.as<float>(), order.as<int>(), p, keys.as<uint>(),
                         rows.as<uint>(), info.as<uint>(), t.tg[0], t.tid, t.nt, t.lane, t.sg);
    });
    if (q8) {
        Buffer scales = load("scales"), srow = load("srow");
        sim::launch(p.n_tiles, p.n_splits, p.n_tok, PE_MM_THREADS, [&](const sim::Ids &t) {
            kernel_bucketmul_q8<X>(x.as<X>(), values.as<char>(), positions.as<uchar>(),
                                   order.as<int>(), p, rows.as<uint>(), info.as<uint>(),
                                   partial.as<float>(), scales.as<half>(), srow.as<uint>(),
                                   uint3{t.tg[0], t.tg[1], t.tg[2]}, t.tid, t.lane, t.sg);
        });
    } else {
        sim::launch(p.n_tiles, p.n_splits, p.n_tok, PE_MM_THREADS, [&](const sim::Ids &t) {
            kernel_bucketmul_f16<X>(x.as<X>(), values.as<half>(), positions.as<uchar>(),
                                    order.as<int>(), p, rows.as<uint>(), info.as<uint>(),
                                    partial.as<float>(), uint3{t.tg[0], t.tg[1], t.tg[2]},
                                    t.tid, t.lane, t.sg);
        });
    }
    reduce<Y>(p, partial, y);
    save("rows", rows);
    save("info", info);
    save("y", y);
}

// kernel_dense_f16, then kernel_reduce.
template <typename X, typename Y> void dense(const pe_metal_params &p) {
    Buffer x = load("x"), w = load("w");
    Buffer partial(4ull * p.n_tok * p.n_splits * p.n_out), y(sizeof(Y) * p.n_tok * p.n_out);
    sim::launch(p.n_tiles, p.n_splits, p.n_tok, PE_MM_THREADS, [&](const sim::Ids &t) {
        kernel_dense_f16<X>(x.as<X>(), w.as<half>(), p, partial.as<float>(),
                            uint3{t.tg[0], t.tg[1], t.tg[2]}, t.tid, t.lane, t.sg);
    });
    reduce<Y>(p, partial, y);
    save("y", y);
}

// One threadgroup of faults.metal's kernel `name` on 128 floats.
void fault(const std::string &name) {
    const uint n = PE_MM_THREADS;
    Buffer a(4 * n), out(4 * n);
    std::memset(a.p.get(), 0, a.n);
    sim::launch(1, 1, 1, n, [&](const sim::Ids &t) {
        if (name == "read_past") kernel_fault_read_past(a.as<float>(), out.as<float>(), n, t.global);
        else if (name == "write_past") kernel_fault_write_past(a.as<float>(), out.as<float>(), n, t.global);
        else if (name == "threadgroup_past") kernel_fault_threadgroup_past(out.as<float>(), t.tid);
        else if (name == "divergent_barrier") kernel_fault_divergent_barrier(out.as<float>(), t.tid, t.lane);
        else if (name == "divergent_simd") kernel_fault_divergent_simd(out.as<float>(), t.tid, t.lane);
        else sim::fail("no fault kernel %s", name.c_str());
    });
    save("out", out);
}

template <typename X> void effort_y(const std::string &y, bool q8, const pe_metal_params &p, uint nt) {
    if (y == "f16") effort<X, half>(q8, p, nt);
    else effort<X, float>(q8, p, nt);
}

template <typename X> void dense_y(const std::string &y, const pe_metal_params &p) {
    if (y == "f16") dense<X, half>(p);
    else dense<X, float>(p);
}

} // namespace

int main(int argc, char **argv) {
    const std::string op = argc > 2 ? argv[1] : "";
    if (argc > 2) g_dir = argv[2];
    if (op == "effort" && argc == 13) {
        const std::string xt = argv[3], vt = argv[4], yt = argv[5];
        const pe_metal_params p = pe_metal_effort_params(
            arg_u(argv[6]), arg_u(argv[7]), arg_u(argv[8]), arg_u(argv[9]),
            std::strtod(argv[10], nullptr), arg_u(argv[11]));
        if (xt == "f16") effort_y<half>(yt, vt == "q8", p, arg_u(argv[12]));
        else effort_y<float>(yt, vt == "q8", p, arg_u(argv[12]));
    } else if (op == "dense" && argc == 9) {
        const std::string xt = argv[3], yt = argv[4];
        const pe_metal_params p =
            pe_metal_dense_params(arg_u(argv[5]), arg_u(argv[6]), arg_u(argv[7]), arg_u(argv[8]));
        if (xt == "f16") dense_y<half>(yt, p);
        else dense_y<float>(yt, p);
    } else if (op == "fault" && argc == 4) {
        fault(argv[3]);
    } else {
        std::fprintf(stderr, "usage: see the head of driver.cpp\n");
        return 2;
    }
    return 0;
}
