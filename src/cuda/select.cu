/* Host-side helpers of the CUDA backend: device queries and status strings. The cutoff selection
 * itself runs inside the effort kernel (bucketmul.cu, with rows.cuh and resolve.cuh); setup.py
 * builds this file and bucketmul.cu into one library. */
#include <cuda_runtime.h>

#include "pe_cuda.h"

extern "C" int pe_cuda_num_sms(void) {
    int dev = 0, n = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return e == cudaSuccess ? n : -(int)e;
}

extern "C" const char *pe_cuda_error_string(int status) {
    if (status == PE_CUDA_ERR_ARG) return "inconsistent arguments";
    return cudaGetErrorString((cudaError_t)status);
}
