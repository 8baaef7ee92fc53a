// ops for GPTQ on the GPU (built with GPTQ_CUDA only): the primitives that quant/gptq_cuda.cpp
// drives. Hessian accumulation, the permutation/dead-column copy, damping, the upper Cholesky
// factor of H^-1 (cuSOLVER, F32) and the blocked column loop with its lazy updates. Device pointers
// throughout, row-major F32 unless said otherwise; everything is queued on the context's stream.
// Like ops_cuda.h, this file and its .cpp are the only callers of kernels/cuda/gptq_quant.cuh.
#pragma once

#include <cstdint>
#include <memory>

#include "core/status.h"
#include "ops/ops_cuda.h"

namespace gptq {

// h_sum[n_in, n_in] upper triangle += x^T x, x: [n_tokens, n_in] device, F32 or F16 bits (x_f16).
status op_cuda_hessian_accumulate(cuda_context& ctx, const void* x, bool x_f16, int64_t n_tokens, int64_t n_in,
                                  float* h_sum);
// h = symmetric(h_sum upper) * scale; h may alias h_sum.
status op_cuda_hessian_finish(cuda_context& ctx, const float* h_sum, float* h, int64_t n_in, float scale);

// trace(D H D^T) for device d [n_out, n_in] and symmetric h [n_in, n_in] (F32 product, double sum);
// waits for the stream.
result<double> op_cuda_hessian_weighted_error(cuda_context& ctx, const float* d, const float* h, int64_t n_out,
                                              int64_t n_in);

// w_out[r, i] = w[r, perm[i]] (0 for dead columns: diag(h) == 0), h_out = h[perm][:, perm] with a
// dead diagonal set to 1. perm: [n_in] I32 device or nullptr (identity).
status op_cuda_gptq_permute(cuda_context& ctx, const float* w, const float* h, const int32_t* perm, float* w_out,
                            float* h_out, int64_t n_out, int64_t n_in);

// The cuSOLVER handle and workspace for the Cholesky step; one per context, reused across layers.
struct cuda_gptq_solver_state;
class cuda_gptq_solver {
public:
    static result<std::unique_ptr<cuda_gptq_solver>> create(cuda_context& ctx);
    ~cuda_gptq_solver();
    // u = h + damp I, then u -> upper Cholesky factor of u^-1 in place (kernels/cpu/linalg.h's
    // contract, the same F32 potrf/potri/potrf sequence). false (not an error) when u is not
    // positive definite. h and u: [n, n] device, distinct. Waits for the stream. With
    // GPTQ_CUDA_CHOLESKY_FLIP=1 when the solver was created: the flipped route (potrf + trtri,
    // gptq_quant.cuh; an experiment: U equal up to rounding, not bit for bit).
    result<bool> damped_cholesky_inverse_upper(cuda_context& ctx, const float* h, float* u, int64_t n, float damp);

private:
    cuda_gptq_solver() = default;
    std::unique_ptr<cuda_gptq_solver_state> s_;
};

// The column loop over all blocks (quant/gptq.cpp step 7): per block of min(block_size, 128)
// columns one kernel (quantize, error feedback inside the block, group params when a group starts),
// then w[:, i2:] -= err . u[block, i2:] with cuBLAS.
struct cuda_gptq_loop_args {
    float*         w        = nullptr;  // [n_out, n_in] permuted weights, updated
    const float*   u        = nullptr;  // [n_in, n_in] upper Cholesky factor of H^-1
    uint8_t*       code     = nullptr;  // [n_out, n_in] out, original column order
    float*         scale    = nullptr;  // [n_groups, n_out]: written (dynamic groups) or read
    int32_t*       zero     = nullptr;  // [n_groups, n_out]
    const int32_t* perm     = nullptr;  // [n_in] or nullptr
    double*        row_loss = nullptr;  // [n_out], zero on entry
    int64_t        n_out = 0, n_in = 0;
    int64_t        block_size     = 128;
    int64_t        group_size     = 0;  // n_in when there are no groups (scale/zero: [1, n_out])
    bool           dynamic_groups = false;
    int            bits = 4, zero_min = 0;
    bool           sym = true, mse = false;
};
status op_cuda_gptq_column_loop(cuda_context& ctx, const cuda_gptq_loop_args& a);

// The largest block the column loop kernel holds (columns per block, in registers).
int64_t cuda_gptq_block_max();

// ---- device-resident linears: a quantized_linear's codes and params on the device ----------------
struct cuda_gptq_codes {
    const uint8_t* code  = nullptr;  // [n_out, n_in] U8, original column order
    const float*   scale = nullptr;  // [n_groups, n_out]
    const int32_t* zero  = nullptr;  // [n_groups, n_out]
    const int32_t* g_idx = nullptr;  // [n_in]
    int64_t        n_out = 0, n_in = 0;
};
// d = w - dequantize(q) (F32, the host's rounding: product then difference, no FMA).
status op_cuda_gptq_dequant_diff(cuda_context& ctx, const float* w, const cuda_gptq_codes& q, float* d);
// out = F16(dequantize(q)); the smallest flat index whose value is outside the F16 range, or -1.
// Waits for the stream.
result<int64_t> op_cuda_gptq_dequant_f16(cuda_context& ctx, const cuda_gptq_codes& q, uint16_t* out);
// dst = F32(src) for n F16 values (exact widening), device arrays.
status op_cuda_f16_to_f32(cuda_context& ctx, const uint16_t* src, float* dst, int64_t n);
// diag [n] (host) = diag(h) of a device h [n, n]; *first_nonfinite = the smallest flat index of a
// NaN / Inf in h, or -1. Waits for the stream.
status op_cuda_diag_check(cuda_context& ctx, const float* h, int64_t n, float* diag, int64_t* first_nonfinite);

}  // namespace gptq
