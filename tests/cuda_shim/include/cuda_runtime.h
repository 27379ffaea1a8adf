// The shim: the CUDA C++ that src/cuda uses, as C++17 for g++, run by the grid simulator
// (../sim.h). Only what the kernels use, with CUDA's meaning; add a construct when a kernel
// needs it.
//   - __global__/__device__ vanish; __shared__ is thread_local (one OS thread per block: one
//     copy per block, zeroed; the dynamic `extern __shared__ smem[]` is sim.h's, filled with
//     0xFF bytes at the start of a block and poisoned past the launch's size for ASan).
//   - global memory is host memory: the driver's buffers are heap blocks of their exact size.
//     Atomics are __atomic builtins (relaxed, as CUDA's), __threadfence a full fence; __ldcg and
//     the PTX loads of common.cuh (pe_sim_ptx.h) tell the simulator when a thread polls.
//   - warp functions take the full mask only; __trap() is a fault.
//   - thread block clusters (cudaLaunchAttributeClusterDimension, 1-D only: x blocks, y = z = 1):
//     the runtime's checks (up to 8 blocks, 16 with cudaFuncAttributeNonPortableClusterSizeAllowed;
//     a divisor of gridDim.x; not with a cooperative launch); the device side (rank, barrier,
//     mapa, distributed shared memory) is pe_sim_ptx.h's, over sim.h. Without the attribute
//     every block is a cluster of one.
// Not simulated: timing, the GPU's weaker memory model (x86 orders more than PTX promises), and
// PDL (a launch runs to its end before the host goes on).
#pragma once
// every system header first: the keyword macros below must not reach them
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <stddef.h>
#include <stdint.h>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../sim.h"

#define PE_CUDA_SIM 1 /* common.cuh: the PTX helpers come from pe_sim_ptx.h */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

// ------------------------------------------------------------ vector types (CUDA's alignment)
struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ------------------------------------------------------------ arithmetic and bits
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}
template <typename T, typename U> inline T sim_bits(U u) {
    static_assert(sizeof(T) == sizeof(U), "a reinterpretation between types of one size");
    T t;
    std::memcpy(&t, &u, sizeof t);
    return t;
}
inline float __int_as_float(int v) { return sim_bits<float>(v); }
inline float __uint_as_float(unsigned v) { return sim_bits<float>(v); }
inline int __float_as_int(float v) { return sim_bits<int>(v); }
inline unsigned __float_as_uint(float v) { return sim_bits<unsigned>(v); }
inline float __fmul_rn(float a, float b) { return a * b; } // -ffp-contract=off: never fused
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
// Bytes of (y:x) picked by the low 3 bits of each selector nibble (PTX prmt, default mode).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)(v >> (8 * ((s >> (4 * i)) & 7)) & 0xFF) << (8 * i);
    return r;
}

[[noreturn]] inline void __trap(sim::Site s = SIM_SITE) {
    sim::fail("__trap() at %s:%d (block %u, thread %u)", sim::base(s.file), s.line, blockIdx.x,
              threadIdx.x);
}
inline void __nanosleep(unsigned) {}

// ------------------------------------------------------------ barriers and warps
inline void __syncthreads(sim::Site s = SIM_SITE) { sim::sync_block(false, s, "__syncthreads"); }
inline int __syncthreads_count(int p, sim::Site s = SIM_SITE) {
    return (int)sim::sync_block(p != 0, s, "__syncthreads_count");
}
inline int __syncthreads_or(int p, sim::Site s = SIM_SITE) {
    return sim::sync_block(p != 0, s, "__syncthreads_or") != 0;
}

template <typename T> inline uint64_t sim_to64(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a scalar");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof v);
    return u;
}
template <typename T> inline T sim_from64(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}
inline unsigned sim_lane() { return threadIdx.x % 32; }

// (no width argument: only whole warps are simulated)
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, sim::Site s = SIM_SITE) {
    return sim_from64<T>(sim::exchange(sim_to64(v), mask, s, "__shfl_sync")[src & 31]);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, sim::Site s = SIM_SITE) {
    const uint64_t *all = sim::exchange(sim_to64(v), mask, s, "__shfl_up_sync");
    const unsigned l = sim_lane();
    return l >= d ? sim_from64<T>(all[l - d]) : v;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int d, sim::Site s = SIM_SITE) {
    const uint64_t *all = sim::exchange(sim_to64(v), mask, s, "__shfl_xor_sync");
    return sim_from64<T>(all[(sim_lane() ^ d) & 31]);
}
inline unsigned __ballot_sync(unsigned mask, int p, sim::Site s = SIM_SITE) {
    const uint64_t *all = sim::exchange(p != 0, mask, s, "__ballot_sync");
    unsigned b = 0;
    for (unsigned l = 0; l < 32; l++) b |= (all[l] ? 1u : 0u) << l;
    return b;
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, sim::Site s = SIM_SITE) {
    const uint64_t *all = sim::exchange(v, mask, s, "__reduce_max_sync");
    unsigned m = 0;
    for (unsigned l = 0; l < 32; l++) m = std::max(m, (unsigned)all[l]);
    return m;
}

// ------------------------------------------------------------ memory
template <typename T> inline void sim_aligned(const T *p, const char *what) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T))
        sim::fail("%s of %zu bytes at %p: misaligned (block %u, thread %u)", what, sizeof(T),
                  (const void *)p, blockIdx.x, threadIdx.x);
}
template <typename T> inline T __ldg(const T *p) { // read-only data: a plain load
    sim_aligned(p, "__ldg");
    return *p;
}
// Loads at L2 (seen by every block): relaxed atomic words; a poll of memory that has not
// changed lets the other threads run.
template <typename T> inline T __ldcg(const T *p, sim::Site s = SIM_SITE) {
    static_assert(sizeof(T) % 4 == 0 && sizeof(T) <= 16, "__ldcg of 4..16 bytes");
    sim_aligned(p, "__ldcg");
    uint32_t w[sizeof(T) / 4];
    uint64_t h = 0;
    for (size_t k = 0; k < sizeof(T) / 4; k++) {
        w[k] = __atomic_load_n(reinterpret_cast<const uint32_t *>(p) + k, __ATOMIC_RELAXED);
        h = h * 0x9E3779B97F4A7C15ull + w[k];
    }
    sim::poll(p, h, s);
    T v;
    std::memcpy(&v, w, sizeof v);
    return v;
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T> inline T atomicAdd(T *p, T v) {
    static_assert(std::is_integral<T>::value, "integer atomics only");
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

// ------------------------------------------------------------ the runtime API
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorCooperativeLaunchTooLarge = 720,
    cudaErrorInvalidClusterSize = 912,
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;

inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
        case cudaErrorInvalidClusterSize: return "invalid cluster size";
    }
    return "unrecognized error code";
}

enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
};
enum cudaLaunchAttributeID {
    cudaLaunchAttributeCooperative = 2,
    cudaLaunchAttributeClusterDimension = 4,
    cudaLaunchAttributeProgrammaticStreamSerialization = 5,
};
union cudaLaunchAttributeValue {
    int cooperative;
    struct {
        unsigned x, y, z;
    } clusterDim;
    unsigned programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
    cudaLaunchAttributeID id;
    cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t { // the runtime's fields, no more
    dim3 gridDim, blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute *attrs;
    unsigned numAttrs;
};

namespace sim {
constexpr int SMS = 132;                 // multiprocessors of the simulated device (an H100)
constexpr int SMEM_DEFAULT = 48 * 1024;  // dynamic shared memory without the attribute
constexpr unsigned CLUSTER_PORTABLE = 8, CLUSTER_NONPORTABLE = 16; // blocks per cluster, at most
inline std::map<const void *, int> g_smem_max; // cudaFuncSetAttribute's, per kernel
inline std::map<const void *, int> g_nonportable;
} // namespace sim

template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
    const void *k = reinterpret_cast<const void *>(kernel);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && value >= 0 && value <= SIM_SMEM_MAX)
        sim::g_smem_max[k] = value;
    else if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed && (value == 0 || value == 1))
        sim::g_nonportable[k] = value;
    else
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

// The blocks per cluster of a launch (1: no cluster attribute) for kernel k in a grid of gx
// blocks, or 0 when the runtime refuses them.
inline unsigned sim_cluster_size(const cudaLaunchAttributeValue *v, const void *k, unsigned gx) {
    if (!v) return 1;
    const unsigned x = v->clusterDim.x;
    if (x != 0 && (v->clusterDim.y != 1 || v->clusterDim.z != 1))
        sim::fail("a cluster of %ux%ux%u blocks: only 1-D clusters are simulated", x,
                  v->clusterDim.y, v->clusterDim.z);
    const auto it = sim::g_nonportable.find(k);
    const bool np = it != sim::g_nonportable.end() && it->second;
    const unsigned most = np ? sim::CLUSTER_NONPORTABLE : sim::CLUSTER_PORTABLE;
    return x == 0 || x > most || gx % x ? 0 : x;
}

// Clusters of cfg's size resident at once: one block per multiprocessor (the kernels' bound),
// all clusters alike (the real device loses some to its GPC boundaries: fewer there).
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveClusters(int *n, void (*kernel)(P...),
                                                  const cudaLaunchConfig_t *cfg) {
    const cudaLaunchAttributeValue *cluster = nullptr;
    for (unsigned k = 0; k < cfg->numAttrs; k++)
        if (cfg->attrs[k].id == cudaLaunchAttributeClusterDimension) cluster = &cfg->attrs[k].val;
    const auto it = sim::g_smem_max.find(reinterpret_cast<const void *>(kernel));
    const size_t smem_max = it == sim::g_smem_max.end() ? sim::SMEM_DEFAULT : it->second;
    if (cfg->dynamicSmemBytes > smem_max) return cudaErrorInvalidConfiguration;
    const unsigned cs = sim_cluster_size(cluster, reinterpret_cast<const void *>(kernel),
                                         cluster ? cluster->clusterDim.x : 1);
    if (cs == 0) return cudaErrorInvalidClusterSize;
    *n = sim::SMS / (int)cs;
    return cudaSuccess;
}

// Checks the launch as the runtime would, then runs it (all blocks at once) to its end. A
// cooperative launch takes at most one block per multiprocessor (the kernels' bound: one block
// of PE_THREADS resident per SM).
template <typename... P, typename... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t *cfg, void (*kernel)(P...),
                                      A &&...args) {
    bool coop = false;
    const cudaLaunchAttributeValue *cluster = nullptr;
    for (unsigned k = 0; k < cfg->numAttrs; k++) {
        const cudaLaunchAttribute &a = cfg->attrs[k];
        if (a.id == cudaLaunchAttributeCooperative) coop = a.val.cooperative != 0;
        else if (a.id == cudaLaunchAttributeClusterDimension) cluster = &a.val;
        else if (a.id != cudaLaunchAttributeProgrammaticStreamSerialization)
            return cudaErrorInvalidValue;
    }
    if (coop && cluster) return cudaErrorInvalidValue;
    const auto it = sim::g_smem_max.find(reinterpret_cast<const void *>(kernel));
    const size_t smem_max = it == sim::g_smem_max.end() ? sim::SMEM_DEFAULT : it->second;
    const dim3 g = cfg->gridDim, b = cfg->blockDim;
    if (cfg->dynamicSmemBytes > smem_max || g.x * g.y * g.z == 0 || b.x * b.y * b.z == 0 ||
        b.x * b.y * b.z > 1024)
        return cudaErrorInvalidConfiguration;
    if (coop && g.x * g.y * g.z > (unsigned)sim::SMS) return cudaErrorCooperativeLaunchTooLarge;
    const unsigned cs = sim_cluster_size(cluster, reinterpret_cast<const void *>(kernel), g.x);
    if (cs == 0) return cudaErrorInvalidClusterSize;
    const std::tuple<P...> params(std::forward<A>(args)...); // copied once, as the runtime does
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    sim::launch(g, b, cfg->dynamicSmemBytes, body, cs);
    return cudaSuccess;
}
