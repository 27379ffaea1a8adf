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

/* ---- thread block clusters: clusters of two blocks unless said (run_cluster) */

/* Block 0 waits in block 1's shared memory for a word that block 1 never writes; block 1 exits
 * without the final cluster barrier that would keep its shared memory: block 0 reads it after
 * the exit (each read polls, so block 1 runs on until it has exited). */
__global__ void k_fault_cluster_exited(uint32_t *) {
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t *s = (uint32_t *)smem;
    s[threadIdx.x] = 0;
    pe_cluster_arrive();
    pe_cluster_wait(); /* both blocks have started; s is zero */
    if (pe_cluster_rank() == 1) return;
    const uint32_t *peer = pe_cluster_map(s, 1);
    while (pe_dsm_ld(peer + threadIdx.x) == 0) {
    }
}

/* The halves of the cluster barrier swapped: a wait with no arrive before it. */
__global__ void k_fault_cluster_wait_first(uint32_t *) {
    pe_cluster_wait();
    pe_cluster_arrive();
}

/* Two arrives with no wait between. */
__global__ void k_fault_cluster_arrive_twice(uint32_t *) {
    pe_cluster_arrive();
    pe_cluster_arrive();
    pe_cluster_wait();
}

/* Block 1 waits, before the cluster barrier, for a count that block 0 makes only after it: a
 * deadlock of the grid (a block that returned would not hold the barrier up: PTX waits only for
 * the threads that have not exited). */
__global__ void k_fault_cluster_missing(uint32_t *out) {
    if (pe_cluster_rank() == 1) pe_wait_geq(out, 1u);
    pe_cluster_arrive();
    pe_cluster_wait();
    if (pe_cluster_rank() == 0) pe_signal(out);
}

/* Block 0 reads block 1's shared memory before the first cluster barrier: block 1 may not have
 * started yet. */
__global__ void k_fault_cluster_early(uint32_t *out) {
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t *s = (uint32_t *)smem;
    s[threadIdx.x] = 1;
    if (pe_cluster_rank() == 0) out[threadIdx.x] = pe_dsm_ld(pe_cluster_map(s, 1) + threadIdx.x);
    pe_cluster_arrive();
    pe_cluster_wait();
}

/* A static __shared__ array mapped onto another block (the simulator maps only `smem`). */
__global__ void k_fault_cluster_map_static(uint32_t *out) {
    __shared__ uint32_t s[FAULT_THREADS];
    s[threadIdx.x] = 1;
    pe_cluster_arrive();
    pe_cluster_wait();
    out[threadIdx.x] = pe_dsm_ld(pe_cluster_map(s, 1 - pe_cluster_rank()) + threadIdx.x);
    pe_cluster_arrive();
    pe_cluster_wait();
}

/* Not a fault: each thread of each block adds blockIdx.x + 1 into a word of the shared memory of
 * its cluster's rank 0; after a cluster barrier each thread reads it back into
 * out[blockIdx.x * FAULT_THREADS + threadIdx.x]; a last barrier keeps rank 0's memory until all
 * have read. The cluster's sum: FAULT_THREADS * the sum of its blockIdx.x + 1. */
__global__ void k_cluster_sum(uint32_t *out) {
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t *s = (uint32_t *)smem;
    if (threadIdx.x == 0) s[0] = 0;
    pe_cluster_arrive();
    pe_cluster_wait(); /* every block started; rank 0's word zeroed */
    uint32_t *sum = pe_cluster_map(s, 0);
    pe_dsm_add(sum, blockIdx.x + 1);
    pe_cluster_arrive();
    pe_cluster_wait();
    out[blockIdx.x * FAULT_THREADS + threadIdx.x] = pe_dsm_ld(sum);
    pe_cluster_arrive_relaxed();
    pe_cluster_wait();
}

#define NO_CLUSTER 0xFFFFFFFFu

/* Not a fault: block 1 of the cluster and warps 2.. of block 0 return at once; the cluster
 * barrier waits only for the threads that have not (PTX), so the others go on: each of them
 * adds 1 to out[0]. */
__global__ void k_cluster_exit_early(uint32_t *out) {
    if (pe_cluster_rank() == 1 || threadIdx.x >= 64) return;
    pe_cluster_arrive();
    pe_cluster_wait();
    pe_cluster_arrive();
    pe_cluster_wait();
    atomicAdd(out, 1u);
}

/* kernel k on a grid of `blocks` x FAULT_THREADS in clusters of `cluster` (NO_CLUSTER: no
 * cluster attribute),
 * FAULT_THREADS * 4 bytes of dynamic shared memory, out zeroed -> the launch's status. */
static cudaError_t launch_cluster(void (*k)(uint32_t *), unsigned blocks, unsigned cluster,
                                  uint32_t *out, bool coop = false) {
    cudaLaunchAttribute attr[2];
    unsigned na = 0;
    if (cluster != NO_CLUSTER) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = cluster;
        attr[na].val.clusterDim.y = attr[na].val.clusterDim.z = 1;
        na++;
    }
    if (coop) {
        attr[na].id = cudaLaunchAttributeCooperative;
        attr[na++].val.cooperative = 1;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(FAULT_THREADS);
    cfg.dynamicSmemBytes = 4 * FAULT_THREADS;
    cfg.attrs = attr;
    cfg.numAttrs = na;
    return cudaLaunchKernelEx(&cfg, k, out);
}

/* k_cluster_sum on `blocks` in clusters of `cluster`: its status, then each block's value (all
 * its threads read the same, else a fault), one "status" line each. */
static void cluster_sum(unsigned blocks, unsigned cluster) {
    uint32_t *out = new uint32_t[blocks * FAULT_THREADS]();
    std::printf("status %d\n", (int)launch_cluster(k_cluster_sum, blocks, cluster, out));
    for (unsigned b = 0; b < blocks; b++) {
        for (unsigned t = 1; t < FAULT_THREADS; t++)
            if (out[b * FAULT_THREADS + t] != out[b * FAULT_THREADS])
                sim::fail("cluster_sum: block %u's threads read different sums", b);
        std::printf("status %u\n", out[b * FAULT_THREADS]);
    }
    delete[] out;
}

/* cluster_NAME: the fault kernels above; cluster_sum (not a fault): 8 blocks in clusters of 4,
 * 3 blocks without the attribute (each its own cluster), then 16 in one cluster (non-portable,
 * allowed by the attribute), then k_cluster_exit_early (its status and out[0]);
 * cluster_refused: the
 * statuses of the launches the runtime refuses, and of the attribute's values. */
static void run_cluster(const std::string &name) {
    uint32_t *out = new uint32_t[FAULT_THREADS]();
    void (*k)(uint32_t *) = nullptr;
    if (name == "cluster_exited") k = k_fault_cluster_exited;
    else if (name == "cluster_wait_first") k = k_fault_cluster_wait_first;
    else if (name == "cluster_arrive_twice") k = k_fault_cluster_arrive_twice;
    else if (name == "cluster_missing") k = k_fault_cluster_missing;
    else if (name == "cluster_early") k = k_fault_cluster_early;
    else if (name == "cluster_map_static") k = k_fault_cluster_map_static;
    if (k) {
        std::printf("status %d\n", (int)launch_cluster(k, 2, 2, out));
    } else if (name == "cluster_sum") {
        cluster_sum(8, 4);
        cluster_sum(3, NO_CLUSTER);
        const cudaError_t e = cudaFuncSetAttribute(
            k_cluster_sum, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        std::printf("status %d\n", (int)e);
        cluster_sum(16, 16);
        std::printf("status %d\n", (int)launch_cluster(k_cluster_exit_early, 2, 2, out));
        std::printf("status %u\n", out[0]);
    } else if (name == "cluster_refused") {
        const unsigned bad[][2] = {{8, 3}, {8, 0}, {16, 16}, {32, 32}, {3, 2}};
        for (const auto &g : bad)
            std::printf("status %d\n", (int)launch_cluster(k_cluster_sum, g[0], g[1], out));
        std::printf("status %d\n", (int)launch_cluster(k_cluster_sum, 2, 2, out, true));
        const cudaFuncAttribute np = cudaFuncAttributeNonPortableClusterSizeAllowed;
        std::printf("status %d\n", (int)cudaFuncSetAttribute(k_cluster_sum, np, 2));
    } else {
        sim::fail("no cluster kernel %s", name.c_str());
    }
    delete[] out;
}

/* One grid (blocks x FAULT_THREADS, FAULT_THREADS * 4 bytes of dynamic shared memory) of
 * kernel `name` on FAULT_THREADS zeroed floats and a zeroed counter. */
static void run_fault(const std::string &name) {
    if (name.rfind("cluster_", 0) == 0) return run_cluster(name);
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
