// The backward ops of LoRA fine-tuning (issue 21 Part 2, docs/lora.md "Fine-tuning"), beside the
// forward ops of ops.h with the same conventions (F32 raw pointers, PyTorch shapes, the context
// says how to run). Each takes the forward op's inputs and dL/d(output) and gives dL/d(input);
// frozen weights get no gradient. A GPU port mirrors this list (one kernel per op).
#pragma once

#include <cstdint>

#include "ops/gptq_linear.h"
#include "ops/ops.h"

namespace gptq {

// op_rms_norm's: dx[n_rows, dim] from x, w and dy (dx may alias dy).
void op_rms_norm_backward(const ops_context& ctx, const float* x, const float* w, const float* dy, float* dx,
                          int64_t n_rows, int64_t dim, float eps);

// op_rope's: rotates dy back in place (the transpose of a rotation: the same tables with -sin).
void op_rope_backward(const ops_context& ctx, float* dy, const float* cos, const float* sin, int64_t n_tokens,
                      int64_t n_heads, int64_t head_dim, int64_t row_stride);

// op_attention's (softcap 0): a.q/k/v as in the forward, dout [n_q, out_stride] (a.out_stride);
// writes dq [n_q, q_stride], dk and dv [n_kv, kv_stride] (a's strides).
void op_attention_backward(const ops_context& ctx, const attention_args& a, const float* dout, float* dq, float* dk,
                           float* dv);

// op_silu_mul's: dgate[n], dup[n] from gate, up and dy (dgate may alias gate or dy, dup up or dy;
// not each other).
void op_silu_mul_backward(const ops_context& ctx, const float* gate, const float* up, const float* dy, float* dgate,
                          float* dup, int64_t n);

// The input gradient of y = x W^T: dx[m, k] (+)= dy[m, n] W[n, k] (accumulate: add to dx).
void op_linear_backward_input(const ops_context& ctx, const float* dy, const float* w, float* dx, int64_t m, int64_t n,
                              int64_t k, bool accumulate);
// The same with W in F16 bits: converted to F32 one block of rows at a time.
void op_linear_f16_backward_input(const ops_context& ctx, const float* dy, const uint16_t* w, float* dx, int64_t m,
                                  int64_t n, int64_t k, bool accumulate);
// The same with a GPTQ W (dx[m, n_in] (+)= dy[m, n_out] W): dequantized one block of output rows
// at a time (gptq_packed_linear::dequantize_rows), never the whole matrix in F32.
void op_gptq_linear_backward_input(const ops_context& ctx, const float* dy, const gptq_packed_linear& w, float* dx,
                                   int64_t m, bool accumulate);

}  // namespace gptq
