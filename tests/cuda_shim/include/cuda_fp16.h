// The shim's half precision (cuda_runtime.h): __half is _Float16 (IEEE binary16, conversions
// rounded to nearest even, as CUDA's _rn); __half2 a pair of them.
#pragma once
#include "cuda_runtime.h"

typedef _Float16 __half;
struct alignas(4) __half2 {
    __half x, y;
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
inline float2 __half22float2(__half2 h) {
    return float2{static_cast<float>(h.x), static_cast<float>(h.y)};
}
inline __half __ushort_as_half(unsigned short v) { return sim_bits<__half>(v); }
