// The PTX helpers of src/cuda/common.cuh in C++ for the simulator (common.cuh includes this
// file instead of its inline PTX when PE_CUDA_SIM is defined): the same memory orders as
// __atomic builtins; a load that reads what it read before tells the simulator that its thread
// polls (sim::poll: the others run). The L1 hint of the row loads and the register pins have
// no meaning here.
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
