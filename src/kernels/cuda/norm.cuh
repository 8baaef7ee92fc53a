// RMSNorm on device memory (F16 activations and weight, F32 arithmetic). Same function as
// kernels/cpu/norm.h: y = x / sqrt(mean(x^2) + eps) * w, one row at a time.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// x: [n_rows, x_stride] F16 (first dim values of each row used); w: [dim] F16;
// y: [n_rows, y_stride] F16, may alias x (same stride). All device pointers.
status rms_norm_f16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_rows, int64_t dim, int64_t x_stride,
                    int64_t y_stride, float eps, cudaStream_t stream);

}  // namespace gptq::cuda
