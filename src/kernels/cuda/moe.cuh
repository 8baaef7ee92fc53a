// The sparse MoE block's kernels (Mixtral, Qwen2-MoE, Qwen3-MoE; model/llama_cuda_moe.h): the
// router's softmax + top-k, row gathers, the grouped expert linears of the decode step (each
// (token, top-k slot) pair times its own expert's weights, the expert read on the device from the
// routing, so the step is one launch per projection and can be captured into a CUDA graph), and
// the weighted sum of the experts' outputs. F16 activations, F32 arithmetic; plain launches.
//
// Pairs: pair p = t * k + j is token t's j-th expert (ids[p], weight w[p]) in torch.topk's order.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "kernels/cuda/gptq_int4.cuh"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// Largest n_expert and k the top-k kernel takes.
constexpr int64_t k_moe_max_experts = 1024;
constexpr int64_t k_moe_max_k       = 32;

// Per token t < n_tokens: p = softmax(logits[t, :n_expert]) in F32 (max subtracted, expf, divided
// by the sum), the k largest in descending order (equal values: the lower expert first, as
// torch.topk), weights p or, with renorm, p / (sum of the k chosen, added in that order).
// logits: [n_tokens, n_expert] F32; ids: [n_tokens, k] I32; weights: [n_tokens, k] F32.
// 1 <= k <= n_expert <= k_moe_max_experts, k <= k_moe_max_k. One warp per token.
status moe_topk_f32(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool renorm, int32_t* ids,
                    float* weights, cudaStream_t stream);

// y[a, :dim] = x[rows[a], :dim] for a < n_rows. x: [.., x_stride], y: [n_rows, dim] F16; rows: I32 device.
status moe_gather_rows_f16(const uint16_t* x, int64_t x_stride, const int32_t* rows, int64_t n_rows, int64_t dim,
                           uint16_t* y, cudaStream_t stream);

// One expert's linear as the grouped kernels read it (a device array of these, indexed by expert).
// int4: w = the int4 layout's weights, sz its scales/zeros (gptq_int4.cuh), perm its act-order
// column order or nullptr; dense: w = the F16 [n_out, n_in] weight, sz and perm nullptr.
// bias: [n_out] F16 or nullptr.
struct moe_expert_linear {
    const void*     w    = nullptr;
    const void*     sz   = nullptr;
    const int32_t*  perm = nullptr;
    const uint16_t* bias = nullptr;
};

// y[p, i] = x[p / x_div, perm_e[i]] (perm_e = table[ids[p]].perm; nullptr: i) for p < n_pairs,
// i < n_in: each pair's input row in its expert's act-order column order. y: [n_pairs, n_in].
status moe_pair_rows_f16(const moe_expert_linear* table, const int32_t* ids, const uint16_t* x, int64_t x_stride,
                         int64_t x_div, int64_t n_pairs, int64_t n_in, uint16_t* y, cudaStream_t stream);

// Grouped linears: y[p, :n_out] = x[p / x_div, :n_in] W_e^T (+ bias_e), e = ids[p], for p < n_pairs.
// int4: every expert on layout L (the same shape and group size); x in the expert's column order
// (moe_pair_rows_f16 when it has a perm), rows 16-byte aligned (x 16-byte aligned, x_stride % 8 == 0).
// dense: W_e F16 [n_out, n_in]. y: [n_pairs, y_stride] F16. order: nullptr, or [n_pairs] I32 the
// pairs in the order their blocks are launched (moe_sort_pairs: pairs of one expert together, so
// that an expert's weights are read from memory about once per step; the results do not depend on it).
status moe_grouped_int4_f16(const int4_layout& L, const moe_expert_linear* table, const int32_t* ids,
                            const int32_t* order, const uint16_t* x, int64_t x_stride, int64_t x_div, int64_t n_pairs,
                            uint16_t* y, int64_t y_stride, cudaStream_t stream);
status moe_grouped_f16(const moe_expert_linear* table, const int32_t* ids, const int32_t* order, const uint16_t* x,
                       int64_t x_stride, int64_t x_div, int64_t n_pairs, int64_t n_out, int64_t n_in, uint16_t* y,
                       int64_t y_stride, cudaStream_t stream);

// order[0 .. n_pairs) = the pairs grouped by expert (ids: [n_pairs] I32, values < n_expert <=
// k_moe_max_experts). One block.
status moe_sort_pairs(const int32_t* ids, int64_t n_pairs, int64_t n_expert, int32_t* order, cudaStream_t stream);

// The block's output: y[t, c] = sum over the token's k experts in ascending expert order of
// weights[t, j] * out[row, c] (row = pos[t * k + j], pos nullptr: t * k + j), then (shared_out
// set) + sigmoid(shared_logit[t]) * shared_out[t, c] (shared_logit nullptr: times 1), in F32, one
// rounding to F16. out: [.., dim], shared_out / y: [n_tokens, dim] F16; shared_logit F32 [n_tokens].
status moe_combine_f16(const uint16_t* out, const int32_t* pos, const int32_t* ids, const float* weights,
                       int64_t n_tokens, int64_t k, int64_t dim, const uint16_t* shared_out, const float* shared_logit,
                       uint16_t* y, cudaStream_t stream);

}  // namespace gptq::cuda
