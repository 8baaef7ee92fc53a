// Rotary position embedding on device memory, same contract as kernels/cpu/rope.h (Hugging Face
// rotate_half pairing i <-> i + head_dim/2, cos/sin tables made by the caller), F16 activations.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// x: [n_tokens, row_stride] F16, the first n_heads * head_dim values of each row are the heads
// ([n_heads, head_dim]); rotated in place. cos, sin: [n_tokens, head_dim / 2] F32. head_dim even.
status rope_f16(uint16_t* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, cudaStream_t stream);

}  // namespace gptq::cuda
