// ops_cuda_train.h over kernels/cuda/train.cuh, convert.cuh and gptq_linear.cuh.
#include "ops/ops_cuda_train.h"

#include <algorithm>

#include "core/dropout_mask.h"
#include "core/error.h"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/gptq_linear.cuh"
#include "kernels/cuda/train.cuh"

namespace gptq {

namespace {
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
// Scores held at once by attention: two [heads][n_q][n_kv] F32 buffers (P and dP) of at most this
// many values each, or one key/value head's group when that alone is larger.
constexpr int64_t k_attn_scores = int64_t(32) << 20;

status attention_check(const cuda_attention_f32_args& a) {
    if (a.n_head_kv <= 0 || a.n_head % a.n_head_kv != 0 || a.head_dim <= 0 || a.q_pos0 < 0 ||
        a.q_pos0 + a.n_q > a.n_kv || a.q_stride < a.n_head * a.head_dim || a.out_stride < a.n_head * a.head_dim ||
        a.kv_stride < a.n_head_kv * a.head_dim)
        return make_error(E_ARG,
                          "op_cuda_attention_f32: n_q {} n_kv {} q_pos0 {} heads {} / {} head_dim {} strides q {} kv "
                          "{} out {}",
                          a.n_q, a.n_kv, a.q_pos0, a.n_head, a.n_head_kv, a.head_dim, a.q_stride, a.kv_stride,
                          a.out_stride);
    return status::ok();
}

// Key/value heads per block, and the scratch (P, then dP when `backward`) for a block.
struct attn_plan {
    int64_t per = 0, group = 0, nn = 0;
    float * p = nullptr, *dp = nullptr;
};
result<attn_plan> attention_plan(cuda_context& ctx, const cuda_attention_f32_args& a, bool backward) {
    attn_plan pl;
    pl.group         = a.n_head / a.n_head_kv;
    pl.nn            = a.n_q * a.n_kv;
    pl.per           = std::clamp<int64_t>(k_attn_scores / std::max<int64_t>(1, pl.group * pl.nn), 1, a.n_head_kv);
    const size_t one = size_t(pl.per * pl.group * pl.nn) * 4;
    GPTQ_ASSIGN_OR_RETURN(void* s, ctx.scratch(backward ? 2 * one : one));
    pl.p  = static_cast<float*>(s);
    pl.dp = backward ? pl.p + one / 4 : nullptr;
    return pl;
}
}  // namespace

status op_cuda_sgemm(cuda_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                     bool tf32) {
    return cuda::sgemm_rm(ctx.blas(), trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, tf32,
                          ctx.stream());
}

namespace {
result<cuda::gptq_linear_params> generic_params(const cuda_gptq_linear& w) {
    if (w.fast)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "GPTQ dequantization for training: a layer [{}, {}] on the fast int4 layout (training loads "
                          "GPTQ layers with allow_fast false)",
                          w.n_out, w.n_in);
    cuda::gptq_linear_params p;
    p.qweight = w.qweight.as<int32_t>(), p.qzeros = w.qzeros.as<int32_t>(), p.scales = w.scales.as<uint16_t>();
    p.g_idx = w.g_idx.as<int32_t>();
    p.n_out = w.n_out, p.n_in = w.n_in, p.n_groups = w.n_groups, p.bits = w.bits, p.zero_add = w.zero_add;
    return p;
}
}  // namespace

status op_cuda_gptq_dequant_f32(cuda_context& ctx, const cuda_gptq_linear& w, float* out) {
    GPTQ_ASSIGN_OR_RETURN(cuda::gptq_linear_params p, generic_params(w));
    return cuda::gptq_dequant_f32(p, out, ctx.stream());
}

status op_cuda_gptq_dequant_bf16(cuda_context& ctx, const cuda_gptq_linear& w, uint16_t* out) {
    GPTQ_ASSIGN_OR_RETURN(cuda::gptq_linear_params p, generic_params(w));
    return cuda::gptq_dequant_bf16(p, out, ctx.stream());
}

status op_cuda_gemm_bf16(cuda_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                         int64_t ldc) {
    return cuda::gemm_bf16_rm(ctx.blas(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ctx.stream());
}

status op_cuda_f32_to_bf16(cuda_context& ctx, const float* src, uint16_t* dst, int64_t n) {
    return cuda::f32_to_bf16(src, dst, n, ctx.stream());
}

status op_cuda_f16_to_bf16(cuda_context& ctx, const uint16_t* src, uint16_t* dst, int64_t n) {
    return cuda::f16_to_bf16(src, dst, n, ctx.stream());
}

status op_cuda_lora_dropout_f32(cuda_context& ctx, const float* x, float* out, int64_t n_rows, int64_t n_in,
                                uint64_t seed, int64_t layer, int role, double p, bool add) {
    if (!(p > 0 && p < 1)) return make_error(E_ARG, "op_cuda_lora_dropout_f32: p {} not in (0, 1)", p);
    return cuda::lora_dropout_f32(x, out, n_rows, n_in, dropout_module_key(seed, layer, role), dropout_threshold(p),
                                  static_cast<float>(1.0 / (1.0 - p)), add, ctx.stream());
}

status op_cuda_embedding_f32(cuda_context& ctx, const uint16_t* table, const int32_t* ids, float* out, int64_t n,
                             int64_t vocab, int64_t dim) {
    return cuda::embedding_f32(table, ids, out, n, vocab, dim, ctx.stream());
}

status op_cuda_rms_norm_f32(cuda_context& ctx, const float* x, const uint16_t* w, float* y, int64_t n_rows, int64_t dim,
                            float eps) {
    return cuda::rms_norm_f32(x, w, y, n_rows, dim, eps, ctx.stream());
}

status op_cuda_rms_norm_backward_f32(cuda_context& ctx, const float* x, const uint16_t* w, const float* dy, float* dx,
                                     int64_t n_rows, int64_t dim, float eps) {
    return cuda::rms_norm_backward_f32(x, w, dy, dx, n_rows, dim, eps, ctx.stream());
}

status op_cuda_rope_f32(cuda_context& ctx, float* x, const float* cos, const float* sin, int64_t n_tokens,
                        int64_t n_heads, int64_t head_dim, int64_t row_stride, bool backward) {
    return cuda::rope_f32(x, cos, sin, n_tokens, n_heads, head_dim, row_stride, backward ? -1.0f : 1.0f, ctx.stream());
}

status op_cuda_silu_mul_f32(cuda_context& ctx, const float* gate, const float* up, float* y, int64_t n) {
    return cuda::silu_mul_f32(gate, up, y, n, ctx.stream());
}

status op_cuda_silu_mul_backward_f32(cuda_context& ctx, const float* gate, const float* up, const float* dy,
                                     float* dgate, float* dup, int64_t n) {
    return cuda::silu_mul_backward_f32(gate, up, dy, dgate, dup, n, ctx.stream());
}

status op_cuda_add_f32(cuda_context& ctx, float* x, const float* y, int64_t n) {
    return cuda::add_f32(x, y, n, ctx.stream());
}

status op_cuda_add_bias_f32(cuda_context& ctx, float* y, const uint16_t* bias, int64_t n_rows, int64_t n) {
    return cuda::add_bias_f32(y, bias, n_rows, n, ctx.stream());
}

status op_cuda_rows_gather_f32(cuda_context& ctx, const float* src, const int32_t* rows, float* dst, int64_t n,
                               int64_t dim) {
    return cuda::rows_gather_f32(src, rows, dst, n, dim, ctx.stream());
}

status op_cuda_rows_scatter_f32(cuda_context& ctx, const float* src, const int32_t* rows, float* dst, int64_t n,
                                int64_t dim) {
    return cuda::rows_scatter_f32(src, rows, dst, n, dim, ctx.stream());
}

// Query head h = j * group + i (key/value head j, member i): its q columns are q + h * hd, so for a
// fixed i the heads of consecutive j are group * hd apart, and k/v's are hd apart: one strided
// batch over the block's key/value heads per member i. Scores of member i, head j of the block at
// P + (i * per + j) * nn.
status op_cuda_attention_f32(cuda_context& ctx, const cuda_attention_f32_args& a) {
    GPTQ_TRY(attention_check(a));
    if (a.n_q == 0) return status::ok();
    GPTQ_ASSIGN_OR_RETURN(attn_plan pl, attention_plan(ctx, a, false));
    const int64_t hd = a.head_dim, G = pl.group, nn = pl.nn;
    for (int64_t j0 = 0; j0 < a.n_head_kv; j0 += pl.per) {
        const int64_t c = std::min(pl.per, a.n_head_kv - j0);
        for (int64_t i = 0; i < G; ++i)
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), false, true, a.n_q, a.n_kv, hd, a.scale, a.q + (j0 * G + i) * hd,
                                    a.q_stride, G * hd, a.k + j0 * hd, a.kv_stride, hd, 0.0f, pl.p + i * c * nn, a.n_kv,
                                    nn, c, a.tf32, ctx.stream()));
        GPTQ_TRY(cuda::causal_softmax_f32(pl.p, G * c, a.n_q, a.n_kv, a.q_pos0, a.window, ctx.stream()));
        for (int64_t i = 0; i < G; ++i)
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), false, false, a.n_q, hd, a.n_kv, 1.0f, pl.p + i * c * nn, a.n_kv, nn,
                                    a.v + j0 * hd, a.kv_stride, hd, 0.0f, a.out + (j0 * G + i) * hd, a.out_stride,
                                    G * hd, c, a.tf32, ctx.stream()));
    }
    return status::ok();
}

status op_cuda_attention_backward_f32(cuda_context& ctx, const cuda_attention_f32_args& a, const float* dout, float* dq,
                                      float* dk, float* dv) {
    GPTQ_TRY(attention_check(a));
    if (a.n_q == 0) return status::ok();
    GPTQ_ASSIGN_OR_RETURN(attn_plan pl, attention_plan(ctx, a, true));
    const int64_t hd = a.head_dim, G = pl.group, nn = pl.nn, nq = a.n_q, nk = a.n_kv;
    const auto    s = ctx.stream();
    for (int64_t j0 = 0; j0 < a.n_head_kv; j0 += pl.per) {
        const int64_t c = std::min(pl.per, a.n_head_kv - j0);
        for (int64_t i = 0; i < G; ++i) {  // P (scores, then softmax) and dP = dout v^T
            const int64_t h0 = (j0 * G + i) * hd;
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), false, true, nq, nk, hd, a.scale, a.q + h0, a.q_stride, G * hd,
                                    a.k + j0 * hd, a.kv_stride, hd, 0.0f, pl.p + i * c * nn, nk, nn, c, a.tf32, s));
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), false, true, nq, nk, hd, 1.0f, dout + h0, a.out_stride, G * hd,
                                    a.v + j0 * hd, a.kv_stride, hd, 0.0f, pl.dp + i * c * nn, nk, nn, c, a.tf32, s));
        }
        GPTQ_TRY(cuda::causal_softmax_f32(pl.p, G * c, nq, nk, a.q_pos0, a.window, s));
        GPTQ_TRY(cuda::softmax_backward_f32(pl.p, pl.dp, G * c * nq, nk, s));  // dP -> dS (unscaled)
        for (int64_t i = 0; i < G; ++i) {
            const int64_t h0   = (j0 * G + i) * hd;
            const float   beta = i > 0 ? 1.0f : 0.0f;  // dk / dv: the group's members summed in order
            const float * pi = pl.p + i * c * nn, *dsi = pl.dp + i * c * nn;
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), false, false, nq, hd, nk, a.scale, dsi, nk, nn, a.k + j0 * hd,
                                    a.kv_stride, hd, 0.0f, dq + h0, a.q_stride, G * hd, c, a.tf32, s));
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), true, false, nk, hd, nq, a.scale, dsi, nk, nn, a.q + h0, a.q_stride,
                                    G * hd, beta, dk + j0 * hd, a.kv_stride, hd, c, a.tf32, s));
            GPTQ_TRY(cuda::sgemm_rm(ctx.blas(), true, false, nk, hd, nq, 1.0f, pi, nk, nn, dout + h0, a.out_stride,
                                    G * hd, beta, dv + j0 * hd, a.kv_stride, hd, c, a.tf32, s));
        }
    }
    return status::ok();
}

status op_cuda_cross_entropy_f32(cuda_context& ctx, float* logits, const int32_t* targets, double* nll, int64_t n_rows,
                                 int64_t n_vocab, float grad_scale, bool grad) {
    return cuda::cross_entropy_f32(logits, targets, nll, n_rows, n_vocab, grad_scale, grad, ctx.stream());
}

}  // namespace gptq
