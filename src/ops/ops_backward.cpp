#include "ops/ops_backward.h"

#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/cpu/backward.h"
#include "kernels/cpu/linalg.h"
#include "kernels/cpu/rope.h"
#include "ops/attention_shape_of.h"

namespace gptq {

namespace {
// Output rows of W dequantized / converted per block in the input-gradient products: 256 rows of
// a 4096-wide layer are 4 MiB of F32, and each block is one sgemm over all of dy's rows.
constexpr int64_t k_weight_block_rows = 256;

void rows_parallel(const ops_context& ctx, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (ctx.pool && n > 1)
        ctx.pool->parallel_for(n, fn);
    else
        fn(0, n);
}
}  // namespace

void op_rms_norm_backward(const ops_context& ctx, const float* x, const float* w, const float* dy, float* dx,
                          int64_t n_rows, int64_t dim, float eps) {
    GPTQ_ASSERT(n_rows >= 0 && dim > 0);
    cpu::rms_norm_backward(x, w, dy, dx, n_rows, dim, eps, ctx.reference ? nullptr : ctx.pool);
}

void op_rope_backward(const ops_context& ctx, float* dy, const float* cos, const float* sin, int64_t n_tokens,
                      int64_t n_heads, int64_t head_dim, int64_t row_stride) {
    std::vector<float> neg(static_cast<size_t>(n_tokens * (head_dim / 2)));
    for (size_t i = 0; i < neg.size(); ++i) neg[i] = -sin[i];
    if (ctx.reference)
        cpu::rope_ref(dy, cos, neg.data(), n_tokens, n_heads, head_dim, row_stride);
    else
        cpu::rope(dy, cos, neg.data(), n_tokens, n_heads, head_dim, row_stride, ctx.pool);
}

void op_attention_backward(const ops_context& ctx, const attention_args& a, const float* dout, float* dq, float* dk,
                           float* dv) {
    const cpu::attention_shape s = attention_shape_of(a);
    if (ctx.reference)
        cpu::attention_backward_ref(a.q, a.k, a.v, dout, dq, dk, dv, s);
    else
        cpu::attention_backward(a.q, a.k, a.v, dout, dq, dk, dv, s, ctx.pool);
}

void op_silu_mul_backward(const ops_context& ctx, const float* gate, const float* up, const float* dy, float* dgate,
                          float* dup, int64_t n) {
    GPTQ_ASSERT(n >= 0 && dgate != dup);
    cpu::silu_mul_backward(gate, up, dy, dgate, dup, n, ctx.reference ? nullptr : ctx.pool);
}

void op_linear_backward_input(const ops_context& ctx, const float* dy, const float* w, float* dx, int64_t m, int64_t n,
                              int64_t k, bool accumulate) {
    GPTQ_ASSERT(m >= 0 && n >= 0 && k >= 0 && dx != dy);
    const float beta = accumulate ? 1.0f : 0.0f;
    if (ctx.reference)
        cpu::sgemm_ref(false, false, m, k, n, 1.0f, dy, n, w, k, beta, dx, k);
    else
        cpu::sgemm(false, false, m, k, n, 1.0f, dy, n, w, k, beta, dx, k, ctx.pool);
}

namespace {
// dx (+)= dy W with W produced block by block: fill(n0, n1, buf) writes rows [n0, n1) of W.
void backward_input_blocks(const ops_context& ctx, const float* dy, float* dx, int64_t m, int64_t n, int64_t k,
                           bool accumulate, const std::function<void(int64_t, int64_t, float*)>& fill) {
    if (!accumulate) std::fill(dx, dx + m * k, 0.0f);
    std::vector<float> buf(static_cast<size_t>(std::min(n, k_weight_block_rows) * k));
    for (int64_t n0 = 0; n0 < n; n0 += k_weight_block_rows) {
        const int64_t nb = std::min(k_weight_block_rows, n - n0);
        rows_parallel(ctx, nb, [&](int64_t r0, int64_t r1) { fill(n0 + r0, n0 + r1, buf.data() + r0 * k); });
        // dx[m, k] += dy[:, n0:n0+nb] W[n0:n0+nb, :]
        if (ctx.reference)
            cpu::sgemm_ref(false, false, m, k, nb, 1.0f, dy + n0, n, buf.data(), k, 1.0f, dx, k);
        else
            cpu::sgemm(false, false, m, k, nb, 1.0f, dy + n0, n, buf.data(), k, 1.0f, dx, k, ctx.pool);
    }
}
}  // namespace

void op_linear_f16_backward_input(const ops_context& ctx, const float* dy, const uint16_t* w, float* dx, int64_t m,
                                  int64_t n, int64_t k, bool accumulate) {
    GPTQ_ASSERT(m >= 0 && n >= 0 && k >= 0 && dx != dy);
    backward_input_blocks(ctx, dy, dx, m, n, k, accumulate, [&](int64_t r0, int64_t r1, float* out) {
        f16_to_f32_row(w + r0 * k, out, static_cast<size_t>((r1 - r0) * k));
    });
}

void op_gptq_linear_backward_input(const ops_context& ctx, const float* dy, const gptq_packed_linear& w, float* dx,
                                   int64_t m, bool accumulate) {
    GPTQ_ASSERT(m >= 0 && dx != dy);
    backward_input_blocks(ctx, dy, dx, m, w.n_out, w.n_in, accumulate,
                          [&](int64_t r0, int64_t r1, float* out) { w.dequantize_rows(r0, r1, out); });
}

}  // namespace gptq
