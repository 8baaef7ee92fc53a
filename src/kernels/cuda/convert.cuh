// Element-type conversion kernels (F16/BF16 <-> F32) on device memory.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// dst[i] = float(src[i]) for i < n. src: [n] F16 bits, dst: [n] F32; both device pointers.
status f16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);
// dst[i] = round_nearest_even(src[i]) as F16 bits.
status f32_to_f16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
// BF16 bits -> F32.
status bf16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);

}  // namespace gptq::cuda
