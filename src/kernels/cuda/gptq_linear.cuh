// GPTQ linear layer straight from the checkpoint's tensors (format.md 1.2-1.5), any bits
// (2, 3, 4, 8), any group size, act-order (g_idx), sym or asym, v1 or v2 zeros: a plain
// dequantize-on-the-fly kernel, correct for every combination and meant as the fallback and
// the reference for the fast kernels (gptq_int4.cuh). y = x W^T (+ bias), W[n, k] =
// scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

struct gptq_linear_params {
    const int32_t*  qweight = nullptr;  // [n_in * bits / 32, n_out] I32, codes packed along k
    const int32_t*  qzeros  = nullptr;  // [n_groups, n_out * bits / 32] I32, zero fields packed along n
    const uint16_t* scales  = nullptr;  // [n_groups, n_out] F16
    const int32_t*  g_idx   = nullptr;  // [n_in] I32, each in [0, n_groups) (checked when read from disk)
    const uint16_t* bias    = nullptr;  // [n_out] F16 or nullptr
    int64_t         n_out = 0, n_in = 0, n_groups = 0;
    int             bits     = 4;
    int             zero_add = 0;  // added to each stored zero field: 1 for v1 ("gptq") checkpoints, 0 for v2
};

// y[m, n_out] = x[m, n_in] W^T (+ bias). x: [m, x_stride] F16, y: [m, y_stride] F16 (no alias).
status gptq_linear_generic_f16(const gptq_linear_params& w, const uint16_t* x, uint16_t* y, int64_t m, int64_t x_stride,
                               int64_t y_stride, cudaStream_t stream);
// w[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]) in F32 for the whole layer, w:
// [n_out, n_in] device F32 in the original column order (the CPU's gptq_packed_linear::dequantize
// arithmetic, bit for bit). For LoRA training's dequantize + cuBLAS products (bias not applied).
status gptq_dequant_f32(const gptq_linear_params& w, float* out, cudaStream_t stream);
// The same rounded to BF16 (bits) once.
status gptq_dequant_bf16(const gptq_linear_params& w, uint16_t* out, cudaStream_t stream);

}  // namespace gptq::cuda
