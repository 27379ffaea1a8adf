// The shim's bfloat16 (cuda_runtime.h): the top 16 bits of a float; from float rounded to
// nearest even (NaN stays NaN), as CUDA's __float2bfloat16_rn.
#pragma once
#include "cuda_runtime.h"

struct __nv_bfloat16 {
    unsigned short bits;
};
inline float __bfloat162float(__nv_bfloat16 h) { return sim_bits<float>((unsigned)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned u = sim_bits<unsigned>(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{(unsigned short)(u >> 16 | 0x40)};
    return __nv_bfloat16{(unsigned short)((u + 0x7FFFu + (u >> 16 & 1u)) >> 16)};
}
