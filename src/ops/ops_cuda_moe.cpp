// MoE ops on the GPU (ops_cuda_moe.h): argument checks and the input gather of the grouped int4
// linear, over kernels/cuda/moe.cuh.
#include "ops/ops_cuda_moe.h"

#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/gptq_int4.cuh"
#include "kernels/cuda/moe.cuh"

namespace gptq {

static_assert(sizeof(cuda_moe_expert_ptrs) == sizeof(cuda::moe_expert_linear) &&
                  offsetof(cuda_moe_expert_ptrs, w) == offsetof(cuda::moe_expert_linear, w) &&
                  offsetof(cuda_moe_expert_ptrs, sz) == offsetof(cuda::moe_expert_linear, sz) &&
                  offsetof(cuda_moe_expert_ptrs, perm) == offsetof(cuda::moe_expert_linear, perm) &&
                  offsetof(cuda_moe_expert_ptrs, bias) == offsetof(cuda::moe_expert_linear, bias),
              "cuda_moe_expert_ptrs is the kernel's moe_expert_linear");

status op_cuda_moe_topk(cuda_context& ctx, const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k,
                        bool renorm, int32_t* ids, float* weights) {
    return cuda::moe_topk_f32(logits, n_tokens, n_expert, k, renorm, ids, weights, ctx.stream());
}

status op_cuda_moe_gather_rows(cuda_context& ctx, const uint16_t* x, int64_t x_stride, const int32_t* rows,
                               int64_t n_rows, int64_t dim, uint16_t* y) {
    return cuda::moe_gather_rows_f16(x, x_stride, rows, n_rows, dim, y, ctx.stream());
}

status op_cuda_moe_grouped_linear(cuda_context& ctx, const cuda_moe_grouped_args& g, const int32_t* ids,
                                  const uint16_t* x, int64_t x_stride, int64_t x_div, int64_t n_pairs, uint16_t* y,
                                  uint16_t* x_work, const int32_t* order) {
    if (n_pairs <= 0) return status::ok();
    const auto* table = reinterpret_cast<const cuda::moe_expert_linear*>(g.table);
    if (!g.int4)
        return cuda::moe_grouped_f16(table, ids, order, x, x_stride, x_div, n_pairs, g.n_out, g.n_in, y, g.n_out,
                                     ctx.stream());
    GPTQ_ASSIGN_OR_RETURN(const cuda::int4_layout lay, cuda::int4_layout_for(g.n_out, g.n_in, g.group_size));
    const bool aligned = x_stride % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    if (g.any_perm || !aligned) {  // each pair's row in its expert's column order, contiguous
        if (!x_work)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "MoE grouped int4 linear: its inputs need a work buffer (act-order or unaligned rows)");
        GPTQ_TRY(cuda::moe_pair_rows_f16(table, ids, x, x_stride, x_div, n_pairs, g.n_in, x_work, ctx.stream()));
        x        = x_work;
        x_stride = g.n_in;
        x_div    = 1;
    }
    return cuda::moe_grouped_int4_f16(lay, table, ids, order, x, x_stride, x_div, n_pairs, y, g.n_out, ctx.stream());
}

status op_cuda_moe_sort_pairs(cuda_context& ctx, const int32_t* ids, int64_t n_pairs, int64_t n_expert,
                              int32_t* order) {
    return cuda::moe_sort_pairs(ids, n_pairs, n_expert, order, ctx.stream());
}

status op_cuda_moe_combine(cuda_context& ctx, const uint16_t* out, const int32_t* pos, const int32_t* ids,
                           const float* weights, int64_t n_tokens, int64_t k, int64_t dim, const uint16_t* shared_out,
                           const float* shared_logit, uint16_t* y) {
    return cuda::moe_combine_f16(out, pos, ids, weights, n_tokens, k, dim, shared_out, shared_logit, y, ctx.stream());
}

}  // namespace gptq
