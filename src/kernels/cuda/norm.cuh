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

// The residual add and the RMSNorm of the next sub-layer in one launch (the decode step's two
// small ops become one): h[r] += add[r] (add may be nullptr: norm only), rounded to F16 as
// add_f16 does, then y[r, i] = norm(h[r])[j] with j = perm[i] (perm: [dim] I32 device, the act-order
// column order of the GPTQ layer that reads y, or nullptr for j = i). Bit for bit add_f16 then
// rms_norm_f16 (then gptq_permute_cols_f16). h: [n_rows, h_stride], add: [n_rows, add_stride],
// y: [n_rows, y_stride], w: [dim], all F16; y must not alias h or add.
status add_rms_norm_f16(uint16_t* h, const uint16_t* add, const uint16_t* w, uint16_t* y, const int32_t* perm,
                        int64_t n_rows, int64_t dim, int64_t h_stride, int64_t add_stride, int64_t y_stride, float eps,
                        cudaStream_t stream);

}  // namespace gptq::cuda
