// The shim's driver: runs a script of src/cuda's C API calls (pe_cuda.h) on buffers that stand
// for device memory (heap blocks of their exact size: built with AddressSanitizer, a byte past
// one is a fault). tests/cuda_shim/cuda_sim.py writes the script and the inputs; one line each:
//   load NAME                    a buffer from DIR/NAME.bin
//   buf NAME BYTES [FILL]        a buffer of BYTES bytes, each FILL (default 0)
//   set NAME OFFSET BYTES FILL   bytes of a buffer, e.g. the info sums zeroed before a call
//   save NAME FILE               the buffer -> DIR/FILE.bin
//   mat I WT ORDER STATS HIST CAND PARTIAL SLOT STATE n_in n_out n_rows ct n_tiles n_splits
//       block0 cand_seg q8 total_w            group.m[I] (SLOT: - for none)
//   group N_MAT N_WORKERS Y0 [Y1 ...]       group sizes and outputs
//   init                                    pe_cuda_init(), then pe_cuda_cluster_init()
//   matmul X XD N_TOK EFF_BUF EFF_VAL EACH YD PDL COOP (EFF_BUF: - for none)
//   matmul_cluster X XD N_TOK EFF_BUF EFF_VAL EACH YD PDL TOL   the cluster kernel (cluster.cu)
//   max_clusters C CT                       pe_cuda_max_clusters: "status S", then "clusters N"
//   dense_q8 X XD N_TOK Q SCALES N_IN N_OUT N_SPLIT PARTIAL COUNT Y YD
//   channel_skip X XD N_TOK K W N_IN N_OUT N_SPLIT ROWS XS PARTIAL COUNT Y YD
//   fault NAME                              faults.cu's kernel NAME
// Each API call prints its status ("status N") on stdout.
#include <cuda_runtime.h>

#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include "pe_cuda.h"

#include "faults.cu"

namespace {

struct Buffer {
    std::unique_ptr<uint8_t[]> p;
    size_t n = 0;
};

std::string g_dir;
std::map<std::string, Buffer> g_buf;

Buffer &get(const std::string &name) {
    auto it = g_buf.find(name);
    if (it == g_buf.end()) sim::fail("driver: no buffer %s", name.c_str());
    return it->second;
}
void *ptr(const std::string &name) { return name == "-" ? nullptr : get(name).p.get(); }

void make(const std::string &name, size_t n, int fill) {
    Buffer b;
    b.p.reset(new uint8_t[n ? n : 1]); // one byte for an empty array: ASan still guards it
    b.n = n;
    std::memset(b.p.get(), fill, n);
    g_buf[name] = std::move(b);
}

void load(const std::string &name) {
    std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
    if (!f) sim::fail("driver: cannot open %s.bin", name.c_str());
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    make(name, s.size(), 0);
    std::memcpy(get(name).p.get(), s.data(), s.size());
}

void save(const std::string &name, const std::string &file) {
    const Buffer &b = get(name);
    std::ofstream f(g_dir + "/" + file + ".bin", std::ios::binary);
    f.write(reinterpret_cast<const char *>(b.p.get()), (std::streamsize)b.n);
    if (!f) sim::fail("driver: cannot write %s.bin", file.c_str());
}

template <typename T> T next(std::istringstream &in) {
    T v;
    if (!(in >> v)) sim::fail("driver: a line ends early");
    return v;
}
std::string word(std::istringstream &in) { return next<std::string>(in); }
long long num(std::istringstream &in) { return next<long long>(in); }

pe_cuda_group g_group = {};

void mat(std::istringstream &in) {
    const long long i = num(in);
    if (i < 0 || i >= PE_MAX_GROUP) sim::fail("driver: matrix %lld", i);
    pe_cuda_matrix &m = g_group.m[i];
    m.wt = static_cast<const uint8_t *>(ptr(word(in)));
    m.order = static_cast<const int32_t *>(ptr(word(in)));
    m.stats = static_cast<const float *>(ptr(word(in)));
    m.hist = static_cast<uint32_t *>(ptr(word(in)));
    m.cand = static_cast<uint32_t *>(ptr(word(in)));
    m.partial = static_cast<unsigned long long *>(ptr(word(in)));
    m.slot = static_cast<const int32_t *>(ptr(word(in)));
    m.state = static_cast<pe_cuda_state *>(ptr(word(in)));
    m.n_in = num(in), m.n_out = num(in), m.n_rows = num(in);
    m.ct = (int32_t)num(in), m.n_tiles = (int32_t)num(in), m.n_splits = (int32_t)num(in);
    m.block0 = (int32_t)num(in), m.cand_seg = (int32_t)num(in), m.q8 = (int32_t)num(in);
    m.total_w = (unsigned long long)num(in);
}

void run_line(const std::string &line) {
    std::istringstream in(line);
    const std::string op = word(in);
    if (op == "load") {
        load(word(in));
    } else if (op == "buf") {
        const std::string name = word(in);
        const long long n = num(in);
        long long fill = 0;
        in >> fill;
        make(name, (size_t)n, (int)fill);
    } else if (op == "set") {
        Buffer &b = get(word(in));
        const long long off = num(in), n = num(in), fill = num(in);
        if (off < 0 || n < 0 || (size_t)(off + n) > b.n) sim::fail("driver: set past a buffer");
        std::memset(b.p.get() + off, (int)fill, (size_t)n);
    } else if (op == "save") {
        const std::string name = word(in);
        save(name, word(in));
    } else if (op == "mat") {
        mat(in);
    } else if (op == "group") {
        g_group.n_mat = (int32_t)num(in);
        g_group.n_workers = (int32_t)num(in);
        for (int i = 0; i < g_group.n_mat && i < PE_MAX_GROUP; i++) g_group.y[i] = ptr(word(in));
    } else if (op == "init") {
        int st = pe_cuda_init();
        if (st == 0) st = pe_cuda_cluster_init();
        std::printf("status %d\n", st);
    } else if (op == "matmul") {
        const void *x = ptr(word(in));
        const int xd = (int)num(in);
        const long long n_tok = num(in);
        const double *ep = static_cast<const double *>(ptr(word(in)));
        const double ev = next<double>(in);
        const int each = (int)num(in), yd = (int)num(in), pdl = (int)num(in), coop = (int)num(in);
        const int st =
            pe_cuda_matmul(&g_group, x, xd, n_tok, ep, ev, each, yd, nullptr, pdl, coop);
        std::printf("status %d\n", st);
    } else if (op == "matmul_cluster") {
        const void *x = ptr(word(in));
        const int xd = (int)num(in);
        const long long n_tok = num(in);
        const double *ep = static_cast<const double *>(ptr(word(in)));
        const double ev = next<double>(in);
        const int each = (int)num(in), yd = (int)num(in), pdl = (int)num(in);
        const double tol = next<double>(in);
        const int st =
            pe_cuda_matmul_cluster(&g_group, x, xd, n_tok, ep, ev, each, yd, nullptr, pdl, tol);
        std::printf("status %d\n", st);
    } else if (op == "max_clusters") {
        const int C = (int)num(in), ct = (int)num(in);
        int n = -1;
        const int st = pe_cuda_max_clusters(C, ct, &n);
        std::printf("status %d\nclusters %d\n", st, n);
    } else if (op == "dense_q8") {
        const void *x = ptr(word(in));
        const int xd = (int)num(in);
        const long long n_tok = num(in);
        const int8_t *q = static_cast<const int8_t *>(ptr(word(in)));
        const uint16_t *sc = static_cast<const uint16_t *>(ptr(word(in)));
        const long long n_in = num(in), n_out = num(in);
        const int n_split = (int)num(in);
        float *partial = static_cast<float *>(ptr(word(in)));
        uint32_t *count = static_cast<uint32_t *>(ptr(word(in)));
        void *y = ptr(word(in));
        const int yd = (int)num(in);
        std::printf("status %d\n", pe_cuda_dense_q8(x, xd, n_tok, q, sc, n_in, n_out, n_split,
                                                    partial, count, y, yd, nullptr, 1));
    } else if (op == "channel_skip") {
        const void *x = ptr(word(in));
        const int xd = (int)num(in);
        const long long n_tok = num(in), k = num(in);
        const uint16_t *w = static_cast<const uint16_t *>(ptr(word(in)));
        const long long n_in = num(in), n_out = num(in);
        const int n_split = (int)num(in);
        int32_t *rows = static_cast<int32_t *>(ptr(word(in)));
        float *xs = static_cast<float *>(ptr(word(in)));
        float *partial = static_cast<float *>(ptr(word(in)));
        uint32_t *count = static_cast<uint32_t *>(ptr(word(in)));
        void *y = ptr(word(in));
        const int yd = (int)num(in);
        const int st = pe_cuda_channel_skip(x, xd, n_tok, k, w, n_in, n_out, n_split, rows, xs,
                                            partial, count, y, yd, nullptr, 1);
        std::printf("status %d\n", st);
    } else if (op == "fault") {
        run_fault(word(in));
    } else {
        sim::fail("driver: unknown command %s", op.c_str());
    }
    std::fflush(stdout);
}

} // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: driver DIR SCRIPT (see the head of driver.cpp)\n");
        return 2;
    }
    g_dir = argv[1];
    std::ifstream script(argv[2]);
    if (!script) sim::fail("driver: cannot open %s", argv[2]);
    std::string line;
    while (std::getline(script, line))
        if (!line.empty() && line[0] != '#') run_line(line);
    return 0;
}
