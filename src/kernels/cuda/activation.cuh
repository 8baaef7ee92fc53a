// Elementwise kernels of the decoder on device memory (F16, F32 arithmetic): SiLU(gate) * up
// (kernels/cpu/activation.h) over rows, so a fused gate_up projection output is read in place,
// the residual add and the bias add of a linear whose GEMM has no bias (cuBLAS).
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// y[r, i] = silu(gate[r, i]) * up[r, i] for r < n_rows, i < n_cols. gate: [n_rows, gate_stride],
// up: [n_rows, up_stride], y: [n_rows, y_stride], all F16; y may alias gate or up element for
// element (for a fused [n_rows, 2 * I] gate_up buffer: gate = buf, up = buf + I, strides 2 * I).
// perm: [n_cols] I32 device or nullptr: y[r, i] = silu(gate[r, perm[i]]) * up[r, perm[i]] (the
// act-order column order of the GPTQ layer that reads y); then y must not alias gate or up.
// block > 0: gate and up are interleaved in blocks of `block` features (the fused decode layout of a
// gate/up projection, docs/cuda.md "The fused decode step"): feature i's column is
// (i / block) 2 block + i % block of gate, and up = gate + block; n_cols % block == 0, y must not
// alias gate or up.
status silu_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                    int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream,
                    const int32_t* perm = nullptr, int64_t block = 0);

// The same with GELU (tanh approximation, transformers' gelu_pytorch_tanh) in place of SiLU:
// y = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) u, F32 math (GeGLU of Gemma).
status gelu_tanh_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                         int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream,
                         const int32_t* perm = nullptr, int64_t block = 0);

// x[i] = cap * tanh(x[i] / cap) for i < n, F32 in place (final logit soft-capping); cap > 0.
status softcap_f32(float* x, int64_t n, float cap, cudaStream_t stream);

// x[i] += y[i] for i < n, F16 (F32 sum, one rounding).
status add_f16(uint16_t* x, const uint16_t* y, int64_t n, cudaStream_t stream);

// x[r, i] += bias[i] for r < n_rows, i < n_cols. x: [n_rows, x_stride] F16, bias: [n_cols] F16.
status add_bias_f16(uint16_t* x, const uint16_t* bias, int64_t n_rows, int64_t n_cols, int64_t x_stride,
                    cudaStream_t stream);

}  // namespace gptq::cuda
