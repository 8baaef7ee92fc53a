// ops of LoRA training on the GPU (GPTQ_CUDA builds; issue 21 Part 2, docs/lora.md "Fine-tuning on
// the GPU"): the forward and backward ops of the decoder layer over F32 device activations, the GPU
// mirror of ops.h / ops_backward.h as model/llama_train.cpp uses them. Weights stay as the
// inference path holds them (F16 tables, norms and biases; GPTQ layers in the generic layout);
// a linear's weight is made F32 on the device for cuBLAS (op_cuda_gptq_dequant_f32 /
// op_cuda_f16_to_f32). Products run on TF32 tensor cores when `tf32` (F32 accumulation), plain F32
// otherwise (the tests' exact mode). Everything is queued on the context's stream.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "ops/ops_cuda.h"
#include "ops/ops_cuda_gptq.h"  // op_cuda_f16_to_f32

namespace gptq {

// The CPU's op_sgemm on the device (row-major): C[m, n] = alpha op(A) op(B) + beta C.
status op_cuda_sgemm(cuda_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                     bool tf32);
// A GPTQ layer as F32 [n_out, n_in] in the original column order (the CPU's dequantize, bit for
// bit). The generic layout only (cuda_gptq_linear_load with allow_fast false): a layer on the fast
// int4 layout is an error (its codes are not kept in the checkpoint's order).
status op_cuda_gptq_dequant_f32(cuda_context& ctx, const cuda_gptq_linear& w, float* out);

// The BF16 mode's products: op_cuda_sgemm's contract with A and B in BF16 (bits), C F32; the
// conversions into BF16 (round to nearest even) and a GPTQ layer dequantized straight to BF16.
status op_cuda_gemm_bf16(cuda_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                         int64_t ldc);
status op_cuda_f32_to_bf16(cuda_context& ctx, const float* src, uint16_t* dst, int64_t n);
status op_cuda_f16_to_bf16(cuda_context& ctx, const uint16_t* src, uint16_t* dst, int64_t n);
status op_cuda_gptq_dequant_bf16(cuda_context& ctx, const cuda_gptq_linear& w, uint16_t* out);

// LoRA dropout of module (layer, role) with mask seed `seed` (core/dropout_mask.h), rows from 0:
// out = dropped(x) (may alias x), or out += dropped(x) when add. p in (0, 1).
status op_cuda_lora_dropout_f32(cuda_context& ctx, const float* x, float* out, int64_t n_rows, int64_t n_in,
                                uint64_t seed, int64_t layer, int role, double p, bool add);

// out[t] = table[ids[t]] as F32 (F16 table [vocab, dim]).
status op_cuda_embedding_f32(cuda_context& ctx, const uint16_t* table, const int32_t* ids, float* out, int64_t n,
                             int64_t vocab, int64_t dim);
// op_rms_norm / op_rms_norm_backward with an F16 weight (dx may alias dy).
status op_cuda_rms_norm_f32(cuda_context& ctx, const float* x, const uint16_t* w, float* y, int64_t n_rows, int64_t dim,
                            float eps);
status op_cuda_rms_norm_backward_f32(cuda_context& ctx, const float* x, const uint16_t* w, const float* dy, float* dx,
                                     int64_t n_rows, int64_t dim, float eps);
// op_rope (backward false) or op_rope_backward (true) in place; cos/sin [n_tokens, head_dim / 2] F32 device.
status op_cuda_rope_f32(cuda_context& ctx, float* x, const float* cos, const float* sin, int64_t n_tokens,
                        int64_t n_heads, int64_t head_dim, int64_t row_stride, bool backward);
status op_cuda_silu_mul_f32(cuda_context& ctx, const float* gate, const float* up, float* y, int64_t n);
// dgate may alias gate or dy, dup up or dy (not each other), as op_silu_mul_backward.
status op_cuda_silu_mul_backward_f32(cuda_context& ctx, const float* gate, const float* up, const float* dy,
                                     float* dgate, float* dup, int64_t n);
status op_cuda_add_f32(cuda_context& ctx, float* x, const float* y, int64_t n);  // x += y
status op_cuda_add_bias_f32(cuda_context& ctx, float* y, const uint16_t* bias, int64_t n_rows, int64_t n);
status op_cuda_rows_gather_f32(cuda_context& ctx, const float* src, const int32_t* rows, float* dst, int64_t n,
                               int64_t dim);  // dst[i] = src[rows[i]]
status op_cuda_rows_scatter_f32(cuda_context& ctx, const float* src, const int32_t* rows, float* dst, int64_t n,
                                int64_t dim);  // dst[rows[i]] = src[i]

// Causal GQA attention of one sequence in F32 (ops.h attention_args' contract, softcap 0).
struct cuda_attention_f32_args {
    const float* q   = nullptr;  // [n_q, q_stride]
    const float* k   = nullptr;  // [n_kv, kv_stride]
    const float* v   = nullptr;  // [n_kv, kv_stride]
    float*       out = nullptr;  // [n_q, out_stride]
    int64_t      n_q = 0, n_kv = 0, q_pos0 = 0;
    int64_t      n_head = 0, n_head_kv = 0, head_dim = 0;
    int64_t      window   = 0;
    float        scale    = 1.0f;
    int64_t      q_stride = 0, kv_stride = 0, out_stride = 0;
    bool         tf32 = false;
};
// out = softmax(scale q k^T over the visible keys) v. Scores of a block of key/value heads (their
// query heads together) at a time in the context's scratch: strided-batched cuBLAS products
// (one launch per query head of a group), a row softmax kernel.
status op_cuda_attention_f32(cuda_context& ctx, const cuda_attention_f32_args& a);
// op_attention_backward: recomputes P, then dv = P^T dout, dS = P (dP - rowsum(P dP)) with
// dP = dout v^T, dq = scale dS k, dk = scale dS^T q; dk/dv summed over the query heads of a group in
// head order. dout [n_q, out_stride]; dq [n_q, q_stride]; dk, dv [n_kv, kv_stride] (head columns
// written, rows no query sees 0).
status op_cuda_attention_backward_f32(cuda_context& ctx, const cuda_attention_f32_args& a, const float* dout, float* dq,
                                      float* dk, float* dv);

// llama_model::output_loss_grad's per-row step: nll[r] = logsumexp(logits[r]) - logits[r, targets[r]]
// (double), and with grad logits[r] = (softmax - onehot) * grad_scale in place. Device pointers.
status op_cuda_cross_entropy_f32(cuda_context& ctx, float* logits, const int32_t* targets, double* nll, int64_t n_rows,
                                 int64_t n_vocab, float grad_scale, bool grad);

}  // namespace gptq
