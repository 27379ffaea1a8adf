/* Kernels with the faults the shim must catch (tests/test_cuda_shim.py): each is a bug a real
 * kernel could have. Not part of the product. Included by driver.cpp. */
#include "common.cuh"

#define FAULT_THREADS 128

/* A barrier inside a branch that half of every warp skips. */
__global__ void k_fault_divergent_barrier(float *out) {
    if (threadIdx.x % 32 < 16) __syncthreads();
    out[threadIdx.x] = 1.f;
}

/* A warp shuffle that half of the lanes skip. */
__global__ void k_fault_divergent_shuffle(float *out) {
    float v = 1.f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    out[threadIdx.x] = v;
}

/* Two barriers where one is meant: warps of even and odd index meet at different lines. */
__global__ void k_fault_split_barrier(float *out) {
    if (threadIdx.x / 32 % 2 == 0) {
        out[threadIdx.x] = 1.f;
        __syncthreads();
    } else {
        out[threadIdx.x] = 2.f;
        __syncthreads();
    }
}

/* Block 0 waits for a count that block 1 never makes (a meeting with one participant too
 * many): a deadlock of the grid. */
__global__ void k_fault_deadlock(uint32_t *counter) {
    if (blockIdx.x == 0) pe_wait_geq(counter, 2u);
    else pe_signal(counter);
}

/* out[i] = out[i + 1]: the last thread reads one element past the end of out. */
__global__ void k_fault_read_past(float *out) {
    const float v = out[threadIdx.x + 1];
    __syncthreads();
    out[threadIdx.x] = v;
}

/* Dynamic shared memory written one element past the launch's size. */
__global__ void k_fault_smem_past(float *out) {
    extern __shared__ __align__(16) unsigned char smem[];
    float *s = (float *)smem;
    s[threadIdx.x + 1] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

/* An 8-byte load at an address that is only 4-byte aligned. */
__global__ void k_fault_misaligned(float *out) {
    const uint2 v = __ldg((const uint2 *)(out + 1));
    out[threadIdx.x] = (float)v.x;
}

/* One grid (blocks x FAULT_THREADS, FAULT_THREADS * 4 bytes of dynamic shared memory) of
 * kernel `name` on FAULT_THREADS zeroed floats and a zeroed counter. */
static void run_fault(const std::string &name) {
    static uint32_t counter;
    void (*k)(float *) = nullptr;
    if (name == "divergent_barrier") k = k_fault_divergent_barrier;
    else if (name == "divergent_shuffle") k = k_fault_divergent_shuffle;
    else if (name == "split_barrier") k = k_fault_split_barrier;
    else if (name == "read_past") k = k_fault_read_past;
    else if (name == "smem_past") k = k_fault_smem_past;
    else if (name == "misaligned") k = k_fault_misaligned;
    else if (name != "deadlock") sim::fail("no fault kernel %s", name.c_str());
    float *buf = new float[FAULT_THREADS](); /* a heap block of its exact size, for ASan */
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(name == "deadlock" ? 2 : 1);
    cfg.blockDim = dim3(FAULT_THREADS);
    cfg.dynamicSmemBytes = 4 * FAULT_THREADS;
    cudaError_t e = k ? cudaLaunchKernelEx(&cfg, k, buf)
                      : cudaLaunchKernelEx(&cfg, k_fault_deadlock, &counter);
    std::printf("status %d\n", (int)e);
    delete[] buf;
}
