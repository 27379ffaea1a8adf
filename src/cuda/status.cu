/* Host-side helper of the CUDA backend: the CUDA runtime's message for a status. The cutoff
 * selection itself runs inside the effort kernel (bucketmul.cu, with rows.cuh and resolve.cuh);
 * setup.py builds this file and bucketmul.cu into one library. */
#include <cuda_runtime.h>

#include "pe_cuda.h"

extern "C" const char *pe_cuda_error_string(int status) {
    if (status <= PE_CUDA_ERR_DEVICE) return NULL;
    return cudaGetErrorString((cudaError_t)(status - PE_CUDA_ERR_DEVICE));
}
