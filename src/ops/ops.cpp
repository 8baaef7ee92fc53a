#include "ops/ops.h"

#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/norm.h"
#include "kernels/cpu/rope.h"
#include "ops/attention_shape_of.h"

namespace gptq {

void op_linear(const ops_context& ctx, const float* x, const float* w, const float* bias, float* y, int64_t m,
               int64_t n, int64_t k) {
    GPTQ_ASSERT(m >= 0 && n >= 0 && k >= 0 && x != y);
    if (ctx.reference)
        cpu::linear_ref(x, w, bias, y, m, n, k);
    else
        cpu::linear_blas(x, w, bias, y, m, n, k, ctx.pool);
}

void op_linear_f16(const ops_context& ctx, const float* x, const uint16_t* w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) {
    GPTQ_ASSERT(m >= 0 && n >= 0 && k >= 0 && x != y);
    if (ctx.reference)
        cpu::linear_f16_ref(x, w, bias, y, m, n, k);
    else
        cpu::linear_f16(x, w, bias, y, m, n, k, ctx.pool);
}

void op_linears_f16(const ops_context& ctx, const float* x, const linear_f16_out* outs, int n_outs, int64_t m,
                    int64_t k) {
    GPTQ_ASSERT(m >= 0 && k >= 0 && n_outs >= 0 && n_outs <= 8);
    if (ctx.reference) {
        for (int j = 0; j < n_outs; ++j) op_linear_f16(ctx, x, outs[j].w, outs[j].bias, outs[j].y, m, outs[j].n, k);
        return;
    }
    cpu::linear_f16_job jobs[8];
    for (int j = 0; j < n_outs; ++j) {
        GPTQ_ASSERT(outs[j].n >= 0 && outs[j].y != x);
        jobs[j] = {outs[j].w, outs[j].bias, outs[j].y, outs[j].n};
    }
    cpu::linears_f16(x, jobs, n_outs, m, k, ctx.pool);
}

void op_rms_norm(const ops_context& ctx, const float* x, const float* w, float* y, int64_t n_rows, int64_t dim,
                 float eps) {
    GPTQ_ASSERT(n_rows >= 0 && dim > 0);
    if (ctx.reference)
        cpu::rms_norm_ref(x, w, y, n_rows, dim, eps);
    else
        cpu::rms_norm(x, w, y, n_rows, dim, eps, ctx.pool);
}

void op_rope_tables(const float* inv_freq, int64_t half, int64_t pos0, int64_t n_tokens, float scaling, float* cos,
                    float* sin) {
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float pos = static_cast<float>(pos0 + t);
        for (int64_t i = 0; i < half; ++i) {
            const float angle = pos * inv_freq[i];
            cos[t * half + i] = std::cos(angle) * scaling;
            sin[t * half + i] = std::sin(angle) * scaling;
        }
    }
}

void op_rope(const ops_context& ctx, float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads,
             int64_t head_dim, int64_t row_stride) {
    GPTQ_ASSERT(head_dim % 2 == 0 && row_stride >= n_heads * head_dim);
    if (ctx.reference)
        cpu::rope_ref(x, cos, sin, n_tokens, n_heads, head_dim, row_stride);
    else
        cpu::rope(x, cos, sin, n_tokens, n_heads, head_dim, row_stride, ctx.pool);
}

void op_attention(const ops_context& ctx, const attention_args& a) {
    const cpu::attention_shape s = attention_shape_of(a);
    GPTQ_ASSERT((a.k16 != nullptr) == (a.v16 != nullptr));
    if (a.k16) {
        if (ctx.reference)
            cpu::attention_f16_ref(a.q, a.k16, a.v16, a.out, s);
        else
            cpu::attention_f16(a.q, a.k16, a.v16, a.out, s, ctx.pool);
    } else if (ctx.reference) {
        cpu::attention_ref(a.q, a.k, a.v, a.out, s);
    } else {
        cpu::attention_blas(a.q, a.k, a.v, a.out, s, ctx.pool);
    }
}

void op_silu_mul(const ops_context& ctx, const float* gate, const float* up, float* y, int64_t n) {
    if (ctx.reference)
        cpu::silu_mul_ref(gate, up, y, n);
    else if (ctx.int8_activations)  // generation's numerics: the vector exp (kernels/cpu/activation.h)
        cpu::silu_mul_fast(gate, up, y, n, ctx.pool);
    else
        cpu::silu_mul(gate, up, y, n, ctx.pool);
}

void op_gelu_tanh_mul(const ops_context& ctx, const float* gate, const float* up, float* y, int64_t n) {
    if (ctx.reference)
        cpu::gelu_tanh_mul_ref(gate, up, y, n);
    else
        cpu::gelu_tanh_mul(gate, up, y, n, ctx.pool);
}

void op_softcap(const ops_context& ctx, float* x, int64_t n, float cap) {
    GPTQ_ASSERT(cap > 0 && n >= 0);
    if (ctx.reference)
        cpu::softcap_ref(x, n, cap);
    else
        cpu::softcap(x, n, cap, ctx.pool);
}

void op_add(const ops_context& ctx, float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];  // memory-bound; one thread saturates it here
}

void op_log_softmax(const ops_context& ctx, const float* x, float* y, int64_t n_rows, int64_t n_cols) {
    if (ctx.reference)
        cpu::log_softmax_rows_ref(x, y, n_rows, n_cols);
    else
        cpu::log_softmax_rows(x, y, n_rows, n_cols, ctx.pool);
}

}  // namespace gptq
