// ops of the sparse MoE block on the GPU (GPTQ_CUDA builds only; model/llama_cuda_moe.h runs them):
// the router's softmax + top-k, row gathers, the grouped expert linears of the decode step and the
// weighted sum. Thin wrappers over kernels/cuda/moe.cuh on the context's stream; like ops_cuda.h,
// this file and its .cpp are the only callers of those kernels. Shapes and the pair numbering
// (pair p = t * k + j: token t's j-th expert) as in moe.cuh.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "ops/ops_cuda.h"

namespace gptq {

// Softmax + top-k (+ renormalisation) of router logits [n_tokens, n_expert] F32 into ids and
// weights [n_tokens, k] (I32, F32) in one launch; exactly moe_route's rule (model/llama_moe.cpp).
status op_cuda_moe_topk(cuda_context& ctx, const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k,
                        bool renorm, int32_t* ids, float* weights);

// y[a] = x[rows[a]] for a < n_rows (rows: device I32), rows of dim F16; x rows x_stride apart.
status op_cuda_moe_gather_rows(cuda_context& ctx, const uint16_t* x, int64_t x_stride, const int32_t* rows,
                               int64_t n_rows, int64_t dim, uint16_t* y);

// One expert's linear for the grouped kernels (kernels/cuda/moe.cuh moe_expert_linear): int4
// layout (w = cuda_gptq_linear::weights, sz, perm or nullptr) or dense F16 (w), bias or nullptr.
struct cuda_moe_expert_ptrs {
    const void*     w    = nullptr;
    const void*     sz   = nullptr;
    const int32_t*  perm = nullptr;
    const uint16_t* bias = nullptr;
};
// One projection of a layer's experts: a device table [n_expert] of cuda_moe_expert_ptrs, all
// experts of the same shape; int4: all on the fast int4 layout with the same group size.
struct cuda_moe_grouped_args {
    const cuda_moe_expert_ptrs* table = nullptr;
    int64_t                     n_out = 0, n_in = 0;
    int64_t                     group_size = 0;  // int4: as cuda_gptq_linear::group_size (-1: one group)
    bool                        int4       = false;
    bool                        any_perm   = false;  // int4: some expert has an act-order permutation
};
// y[p, :n_out] = x[p / x_div] W_{ids[p]}^T (+ bias) for p < n_pairs, one launch (two when the
// inputs are first gathered into x_work: int4 with any_perm or rows not 16-byte aligned; x_work:
// device F16 [n_pairs, n_in]). y: [n_pairs, n_out] F16. Graph-capturable (nothing allocated).
// order: nullptr or op_cuda_moe_sort_pairs' [n_pairs] (the blocks of one expert's pairs launched
// together: its weights read about once; the same results).
status op_cuda_moe_grouped_linear(cuda_context& ctx, const cuda_moe_grouped_args& g, const int32_t* ids,
                                  const uint16_t* x, int64_t x_stride, int64_t x_div, int64_t n_pairs, uint16_t* y,
                                  uint16_t* x_work, const int32_t* order = nullptr);
// order[0 .. n_pairs) = the pairs p (ids[p]: their experts, < n_expert) grouped by expert, one launch.
status op_cuda_moe_sort_pairs(cuda_context& ctx, const int32_t* ids, int64_t n_pairs, int64_t n_expert, int32_t* order);

// y[t] = sum of the token's k experts' out rows (row pos[t * k + j], pos nullptr: t * k + j) times
// their weights in ascending expert order, + sigmoid(shared_logit[t]) * shared_out[t] when
// shared_out is set (shared_logit nullptr: weight 1); F32 sum, F16 out. y: [n_tokens, dim].
status op_cuda_moe_combine(cuda_context& ctx, const uint16_t* out, const int32_t* pos, const int32_t* ids,
                           const float* weights, int64_t n_tokens, int64_t k, int64_t dim, const uint16_t* shared_out,
                           const float* shared_logit, uint16_t* y);

}  // namespace gptq
