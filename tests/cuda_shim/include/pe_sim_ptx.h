// The PTX helpers of src/cuda/common.cuh in C++ for the simulator (common.cuh includes this
// file instead of its inline PTX when PE_CUDA_SIM is defined): the same memory orders as
// __atomic builtins; a load that reads what it read before tells the simulator that its thread
// polls (sim::poll: the others run). The L1 hint of the row loads and the register pins have
// no meaning here. Thread block clusters (sim.h): %cluster_ctarank is blockIdx.x % the
// cluster's blocks; barrier.cluster.arrive/wait meet every thread of the cluster that has not
// returned (checked: alternately, each by a whole warp at one line); mapa maps this block's
// dynamic shared memory (not a static __shared__ variable: those are thread_local here) onto
// another block's; the pe_dsm_* are relaxed atomics through such a pointer, checked against the
// blocks of the cluster (inside one's dynamic shared memory, not exited, not before the
// thread's first cluster wait).
#pragma once
#include "cuda_runtime.h"

__device__ __forceinline__ uint32_t pe_ld_acquire(const uint32_t *p, sim::Site s = SIM_SITE) {
    const uint32_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    sim::poll(p, v, s);
    return v;
}
__device__ __forceinline__ unsigned long long pe_ld_relaxed64(const unsigned long long *p,
                                                              sim::Site s = SIM_SITE) {
    sim_aligned(p, "ld.relaxed.u64");
    const unsigned long long v = __atomic_load_n(p, __ATOMIC_RELAXED);
    sim::poll(p, v, s);
    return v;
}
__device__ __forceinline__ unsigned long long pe_ld_acquire64(const unsigned long long *p,
                                                              sim::Site s = SIM_SITE) {
    sim_aligned(p, "ld.acquire.u64");
    const unsigned long long v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    sim::poll(p, v, s);
    return v;
}
__device__ __forceinline__ void pe_st_relaxed64(unsigned long long *p, unsigned long long v) {
    sim_aligned(p, "st.relaxed.u64");
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
__device__ __forceinline__ void pe_st_release64(unsigned long long *p, unsigned long long v) {
    sim_aligned(p, "st.release.u64");
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
__device__ __forceinline__ uint2 pe_ld_na_v2(const uint8_t *a) {
    return __ldg(reinterpret_cast<const uint2 *>(a));
}
__device__ __forceinline__ uint32_t pe_ld_na_u32(const uint8_t *a) {
    return __ldg(reinterpret_cast<const uint32_t *>(a));
}
__device__ __forceinline__ uint32_t pe_ld_na_u16(const uint8_t *a) {
    return __ldg(reinterpret_cast<const unsigned short *>(a));
}
__device__ __forceinline__ void pe_opaque(const uint8_t *&, const uint8_t *&) {}
__device__ __forceinline__ void pe_opaque(const uint8_t *&, const uint8_t *&, const uint8_t *&) {}

__device__ __forceinline__ uint32_t pe_cluster_rank() { return sim::blk->rank; }
__device__ __forceinline__ void pe_cluster_arrive(sim::Site s = SIM_SITE) {
    sim::cluster_arrive(s, "pe_cluster_arrive");
}
__device__ __forceinline__ void pe_cluster_arrive_relaxed(sim::Site s = SIM_SITE) {
    sim::cluster_arrive(s, "pe_cluster_arrive_relaxed");
}
__device__ __forceinline__ void pe_cluster_wait(sim::Site s = SIM_SITE) { sim::cluster_wait(s); }
template <typename T>
__device__ __forceinline__ T *pe_cluster_map(T *p, uint32_t rank, sim::Site s = SIM_SITE) {
    return static_cast<T *>(sim::cluster_map(p, rank, s));
}
__device__ __forceinline__ uint32_t pe_dsm_ld(const uint32_t *p, sim::Site s = SIM_SITE) {
    sim_aligned(p, "pe_dsm_ld");
    sim::dsm_check(p, sizeof *p, s, "pe_dsm_ld");
    const uint32_t v = __atomic_load_n(p, __ATOMIC_RELAXED);
    sim::poll(p, v, s);
    return v;
}
__device__ __forceinline__ float pe_dsm_ldf(const float *p, sim::Site s = SIM_SITE) {
    return __uint_as_float(pe_dsm_ld(reinterpret_cast<const uint32_t *>(p), s));
}
__device__ __forceinline__ void pe_dsm_add(uint32_t *p, uint32_t v, sim::Site s = SIM_SITE) {
    sim_aligned(p, "pe_dsm_add");
    sim::dsm_check(p, sizeof *p, s, "pe_dsm_add");
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
