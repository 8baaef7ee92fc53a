// Kernels of LoRA training on the GPU (issue 21 Part 2, docs/lora.md "Fine-tuning on the GPU"):
// the decoder layer's forward and backward over F32 activations (the CPU training path's
// arithmetic, kernels/cpu/backward.h), and a row-major strided-batched F32 GEMM (cuBLAS; TF32
// tensor cores when asked). Weights stay as the inference path holds them (F16 norm weights,
// biases and tables, read as F32). Raw device pointers, queued on `stream`.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st*   cudaStream_t;
typedef struct cublasContext* cublasHandle_t;

namespace gptq::cuda {

// Row-major, as the CPU's op_sgemm: for b < batch, C_b[m, n] = alpha op(A_b) op(B_b) + beta C_b,
// op(A) [m, k] (A stored [m, lda], or [k, lda] transposed when ta), op(B) [k, n] (B stored [k, ldb],
// or [n, ldb] when tb), C [m, ldc]; X_b = X + b * stride_x (strides in floats, 0 allowed for A/B).
// tf32: tensor cores with TF32 inputs (10-bit mantissa) and F32 accumulation; else plain F32.
status sgemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                int64_t ldc, int64_t stride_c, int64_t batch, bool tf32, cudaStream_t stream);

// The same contract with BF16 operands (bits; A and B both BF16) and an F32 C, F32 accumulation
// (tensor cores). No batch.
status gemm_bf16_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                    int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc,
                    cudaStream_t stream);
// dst[i] = bf16(src[i]) (round to nearest even), from F32 or from F16 bits.
status f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
status f16_to_bf16(const uint16_t* src, uint16_t* dst, int64_t n, cudaStream_t stream);

// LoRA dropout (core/dropout_mask.h): v = x[i, c] / (1 - p) where element i * n_in + c of the module
// with key `module_key` is kept (threshold), else 0; out = v, or out += v when add. out may alias x
// (not with add).
status lora_dropout_f32(const float* x, float* out, int64_t n_rows, int64_t n_in, uint64_t module_key,
                        uint32_t threshold, float inv_keep, bool add, cudaStream_t stream);

// out[t, :] = float(table[ids[t], :]) (F16 table [vocab, dim]; an id outside [0, vocab): zeros).
status embedding_f32(const uint16_t* table, const int32_t* ids, float* out, int64_t n, int64_t vocab, int64_t dim,
                     cudaStream_t stream);
// y = w * (x * inv), inv = 1 / sqrt(mean(x^2) + eps) per row (sum of squares in double); w F16 [dim].
status rms_norm_f32(const float* x, const uint16_t* w, float* y, int64_t n_rows, int64_t dim, float eps,
                    cudaStream_t stream);
// kernels/cpu/backward.h rms_norm_backward: dx = r w dy - x r^3 mean(w dy x) (double sums); dx may alias dy.
status rms_norm_backward_f32(const float* x, const uint16_t* w, const float* dy, float* dx, int64_t n_rows, int64_t dim,
                             float eps, cudaStream_t stream);
// The rotation of ops.h op_rope in place, pairs (i, i + head_dim / 2) of each head, with sin
// multiplied by sin_sign (-1: the backward, the transposed rotation). cos/sin [n_tokens, head_dim / 2].
status rope_f32(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, float sin_sign, cudaStream_t stream);
// y = silu(g) * u; and its backward (kernels/cpu/backward.h silu_mul_backward; dg may alias g or
// dy, du u or dy). All [n].
status silu_mul_f32(const float* g, const float* u, float* y, int64_t n, cudaStream_t stream);
status silu_mul_backward_f32(const float* g, const float* u, const float* dy, float* dg, float* du, int64_t n,
                             cudaStream_t stream);
// x[i] += y[i]; y[r, :] += float(bias[:]) (bias F16 [n]).
status add_f32(float* x, const float* y, int64_t n, cudaStream_t stream);
status add_bias_f32(float* y, const uint16_t* bias, int64_t n_rows, int64_t n, cudaStream_t stream);
// dst[i, :] = src[rows[i], :] and dst[rows[i], :] = src[i, :] for i < n (rows: device I32).
status rows_gather_f32(const float* src, const int32_t* rows, float* dst, int64_t n, int64_t dim, cudaStream_t stream);
status rows_scatter_f32(const float* src, const int32_t* rows, float* dst, int64_t n, int64_t dim, cudaStream_t stream);

// Attention's softmax over scores s [n_mat][n_q][n_kv] (already scaled), in place: query i of each
// matrix sits at position q_pos0 + i and sees key j when j <= q_pos0 + i and, window > 0,
// q_pos0 + i - j < window (kernels/cpu/attention.h); the keys it does not see get probability 0.
status causal_softmax_f32(float* s, int64_t n_mat, int64_t n_q, int64_t n_kv, int64_t q_pos0, int64_t window,
                          cudaStream_t stream);
// dp = p * (dp - rowsum(p * dp)) per row of [n_rows, n_cols] (the row sum in double).
status softmax_backward_f32(const float* p, float* dp, int64_t n_rows, int64_t n_cols, cudaStream_t stream);
// Cross-entropy of each row of logits [n_rows, n_vocab] against targets[r] (device I32, each in
// [0, n_vocab)): nll[r] = logsumexp - logit[target] (double sums, as llama_model::output_loss_grad).
// grad: logits become (softmax - onehot(target)) * grad_scale in place.
status cross_entropy_f32(float* logits, const int32_t* targets, double* nll, int64_t n_rows, int64_t n_vocab,
                         float grad_scale, bool grad, cudaStream_t stream);

}  // namespace gptq::cuda
