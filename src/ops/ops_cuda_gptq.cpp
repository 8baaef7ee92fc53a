// GPTQ ops on the GPU (GPTQ_CUDA builds only): thin wrappers over kernels/cuda/gptq_quant.cuh
// on the context's stream and handles, the cuSOLVER handle's lifetime, and the block loop.
#include "ops/ops_cuda_gptq.h"

#include <cusolverDn.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gptq_quant.cuh"

namespace gptq {

namespace {
constexpr int64_t k_block_max = 128;  // gptq_quant.cu: 4 columns per lane
}

int64_t cuda_gptq_block_max() {
    return k_block_max;
}

status op_cuda_hessian_accumulate(cuda_context& ctx, const void* x, bool x_f16, int64_t n_tokens, int64_t n_in,
                                  float* h_sum) {
    return cuda::gptq_hessian_accumulate(ctx.blas(), x, x_f16, n_tokens, n_in, h_sum, ctx.stream());
}

status op_cuda_hessian_finish(cuda_context& ctx, const float* h_sum, float* h, int64_t n_in, float scale) {
    return cuda::gptq_hessian_finish(h_sum, h, n_in, scale, ctx.stream());
}

result<double> op_cuda_hessian_weighted_error(cuda_context& ctx, const float* d, const float* h, int64_t n_out,
                                              int64_t n_in) {
    GPTQ_ASSIGN_OR_RETURN(cuda_buffer work, cuda_buffer::alloc(size_t(std::max<int64_t>(n_out * n_in, 1)) * 4));
    GPTQ_ASSIGN_OR_RETURN(cuda_buffer out, cuda_buffer::alloc(sizeof(double)));
    GPTQ_TRY(
        cuda::gptq_weighted_error(ctx.blas(), d, h, work.as<float>(), n_out, n_in, out.as<double>(), ctx.stream()));
    double v = 0.0;
    GPTQ_TRY(cuda_copy_to_host(ctx, &v, out.data(), sizeof(double)));
    return v;
}

status op_cuda_gptq_permute(cuda_context& ctx, const float* w, const float* h, const int32_t* perm, float* w_out,
                            float* h_out, int64_t n_out, int64_t n_in) {
    return cuda::gptq_permute(w, h, perm, w_out, h_out, n_out, n_in, ctx.stream());
}

// ---- cuda_gptq_solver ---------------------------------------------------------------------------

struct cuda_gptq_solver_state {
    cusolverDnHandle_t handle = nullptr;
    cuda_buffer        work;  // potrf/potri workspace, grown on demand
    cuda_buffer        info;  // one I32 devInfo
    int64_t            work_n    = -1;
    size_t             work_need = 0;  // what n = work_n needs: the lwork passed (a kept solver's
                                       // larger buffer must not change cuSOLVER's choices)
    bool              flip = false;    // GPTQ_CUDA_CHOLESKY_FLIP=1: the flipped route (gptq_quant.cuh)
    std::vector<char> host_work;       // its trtri's host workspace
    size_t            host_need = 0;
};

result<std::unique_ptr<cuda_gptq_solver>> cuda_gptq_solver::create(cuda_context& ctx) {
    std::unique_ptr<cuda_gptq_solver> s(new cuda_gptq_solver());
    s->s_ = std::make_unique<cuda_gptq_solver_state>();
    GPTQ_CUDA_CHECK(cudaSetDevice(ctx.device()));
    const cusolverStatus_t st = cusolverDnCreate(&s->s_->handle);
    if (st != CUSOLVER_STATUS_SUCCESS)
        return make_error(status_code::STATUS_INTERNAL, "cusolverDnCreate failed on cuda:{} (cuSOLVER status {})",
                          ctx.device(), static_cast<int>(st));
    auto info = cuda_buffer::alloc(sizeof(int));
    if (!info) return info.error();
    s->s_->info     = std::move(*info);
    const char* env = std::getenv("GPTQ_CUDA_CHOLESKY_FLIP");
    s->s_->flip     = env && std::string(env) == "1";
    return s;
}

cuda_gptq_solver::~cuda_gptq_solver() {
    if (s_ && s_->handle) cusolverDnDestroy(s_->handle);
}

result<bool> cuda_gptq_solver::damped_cholesky_inverse_upper(cuda_context& ctx, const float* h, float* u, int64_t n,
                                                             float damp) {
    if (s_->work_n != n) {
        size_t host  = 0;
        auto   bytes = s_->flip ? cuda::gptq_cholesky_flip_workspace_bytes(s_->handle, u, n, &host)
                                : cuda::gptq_cholesky_workspace_bytes(s_->handle, u, n);
        if (!bytes) return bytes.error();
        if (s_->host_work.size() < host) s_->host_work.resize(host);
        s_->host_need = host;
        if (s_->work.bytes() < *bytes) {
            GPTQ_TRY(ctx.synchronize());
            auto b = cuda_buffer::alloc(*bytes);
            if (!b) return b.error();
            s_->work = std::move(*b);
        }
        s_->work_n    = n;
        s_->work_need = *bytes;
    }
    bool pd = false;
    if (s_->flip) {
        GPTQ_TRY(cuda::gptq_damp_flip_copy(h, u, n, damp, ctx.stream()));
        GPTQ_TRY(cuda::gptq_cholesky_inverse_upper_flip(s_->handle, u, n, s_->work.data(), s_->work_need,
                                                        s_->host_work.data(), s_->host_need, s_->info.as<int>(), &pd,
                                                        ctx.stream()));
        return pd;
    }
    GPTQ_TRY(cuda::gptq_damp_copy(h, u, n, damp, ctx.stream()));
    GPTQ_TRY(cuda::gptq_cholesky_inverse_upper(s_->handle, u, n, s_->work.data(), s_->work_need, s_->info.as<int>(),
                                               &pd, ctx.stream()));
    return pd;
}

// ---- the column loop ------------------------------------------------------------------------------

status op_cuda_gptq_column_loop(cuda_context& ctx, const cuda_gptq_loop_args& a) {
    if (a.n_out <= 0 || a.n_in <= 0) return status::ok();
    if (a.block_size <= 0 || a.group_size <= 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "gptq (cuda): block size {} / group size {}",
                          a.block_size, a.group_size);
    const int64_t B = std::min(a.block_size, k_block_max);
    auto          e = ctx.scratch(static_cast<size_t>(a.n_out * B) * sizeof(float));  // err [n_out, nb]
    if (!e) return e.error();
    cuda::gptq_block_args k;
    k.w              = a.w;
    k.u              = a.u;
    k.err            = static_cast<float*>(*e);
    k.code           = a.code;
    k.scale          = a.scale;
    k.zero           = a.zero;
    k.perm           = a.perm;
    k.row_loss       = a.row_loss;
    k.n_out          = a.n_out;
    k.n_in           = a.n_in;
    k.group_size     = a.group_size;
    k.dynamic_groups = a.dynamic_groups;
    k.bits           = a.bits;
    k.zero_min       = a.zero_min;
    k.sym            = a.sym;
    k.mse            = a.mse;
    for (int64_t i1 = 0; i1 < a.n_in; i1 += B) {
        k.i1 = i1;
        k.nb = std::min(a.n_in, i1 + B) - i1;
        GPTQ_TRY(cuda::gptq_quantize_block(k, ctx.stream()));
        GPTQ_TRY(cuda::gptq_lazy_update(ctx.blas(), a.w, a.u, k.err, a.n_out, a.n_in, i1, k.nb, ctx.stream()));
    }
    return status::ok();
}

// ---- device-resident linears ------------------------------------------------------------------

namespace {
cuda::gptq_codes_view view_of(const cuda_gptq_codes& q) {
    cuda::gptq_codes_view v;
    v.code  = q.code;
    v.scale = q.scale;
    v.zero  = q.zero;
    v.g_idx = q.g_idx;
    v.n_out = q.n_out;
    v.n_in  = q.n_in;
    return v;
}
}  // namespace

status op_cuda_gptq_dequant_diff(cuda_context& ctx, const float* w, const cuda_gptq_codes& q, float* d) {
    return cuda::gptq_dequant_diff(w, view_of(q), d, ctx.stream());
}

result<int64_t> op_cuda_gptq_dequant_f16(cuda_context& ctx, const cuda_gptq_codes& q, uint16_t* out) {
    GPTQ_ASSIGN_OR_RETURN(void* flag, ctx.scratch(sizeof(int64_t)));
    GPTQ_TRY(cuda::gptq_dequant_f16(view_of(q), out, static_cast<int64_t*>(flag), ctx.stream()));
    int64_t first = 0;
    GPTQ_TRY(cuda_copy_to_host(ctx, &first, flag, sizeof(int64_t)));
    return first < q.n_out * q.n_in ? first : int64_t(-1);
}

status op_cuda_f16_to_f32(cuda_context& ctx, const uint16_t* src, float* dst, int64_t n) {
    if (n <= 0) return status::ok();
    return cuda::f16_to_f32(src, dst, n, ctx.stream());
}

status op_cuda_diag_check(cuda_context& ctx, const float* h, int64_t n, float* diag, int64_t* first_nonfinite) {
    GPTQ_ASSIGN_OR_RETURN(void* buf, ctx.scratch(sizeof(int64_t) + size_t(std::max<int64_t>(n, 1)) * sizeof(float)));
    auto* flag   = static_cast<int64_t*>(buf);
    auto* diag_d = reinterpret_cast<float*>(static_cast<char*>(buf) + sizeof(int64_t));
    GPTQ_TRY(cuda::gptq_diag_check(h, n, diag_d, flag, ctx.stream()));
    int64_t first = 0;
    GPTQ_TRY(cuda_copy_to_host(ctx, &first, flag, sizeof(int64_t)));
    if (n > 0) GPTQ_TRY(cuda_copy_to_host(ctx, diag, diag_d, size_t(n) * sizeof(float)));
    *first_nonfinite = first < n * n ? first : int64_t(-1);
    return status::ok();
}

}  // namespace gptq
