// The backward ops of LoRA fine-tuning (ops/ops_backward.h, kernels/cpu/backward.h), each against
// (1) central finite differences of a double-precision forward of the same op: with L = sum(dy *
// f(x)), dL/dx_i = (L(x + h e_i) - L(x - h e_i)) / 2h, which the op's dx must match, and (2) a plain
// reference (attention: the BLAS kernel against the double loops; linears: double dy W of the
// dequantized weights), on tiny and awkward shapes (1 row, odd sizes, GQA groups, sliding window,
// queries after cached keys, several weight blocks, act-order GPTQ).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "kernels/cpu/backward.h"
#include "ops/ops.h"
#include "ops/ops_backward.h"

using namespace gptq;

namespace {

// Finite differences of a double forward with h = 1e-5 are exact to ~1e-9 relative; the ops compute
// in F32 with double sums, so their error is F32 rounding of O(dim) terms: 1e-4 of the largest
// gradient entry.
constexpr double k_fd_tol = 1e-4;
// BLAS kernel against the double reference: F32 sgemms and softmax over up to 70 keys.
constexpr double k_ref_tol = 1e-5;
constexpr double k_h       = 1e-5;

using dvec = std::vector<double>;

std::vector<float> randn(size_t n, std::mt19937& rng, float sd = 1.0f) {
    std::normal_distribution<float> d(0.0f, sd);
    std::vector<float>              v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double max_abs(const std::vector<float>& v) {
    double m = 1e-30;
    for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
    return m;
}

// max |a - b| / max |b|
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
    return d / max_abs(b);
}

// Central differences of loss(x) for every entry of x (double).
std::vector<float> numeric_grad(const std::vector<float>& x, const std::function<double(const dvec&)>& loss) {
    dvec               xd(x.begin(), x.end());
    std::vector<float> g(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = xd[i];
        xd[i]           = x0 + k_h;
        const double lp = loss(xd);
        xd[i]           = x0 - k_h;
        const double lm = loss(xd);
        xd[i]           = x0;
        g[i]            = static_cast<float>((lp - lm) / (2 * k_h));
    }
    return g;
}

double dot(const dvec& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

// Double forward of causal GQA attention (kernels/cpu/attention.h's contract, compact strides).
dvec attention_fwd(const dvec& q, const dvec& k, const dvec& v, const cpu::attention_shape& s) {
    const int64_t hd = s.head_dim, group = s.n_head / s.n_head_kv;
    dvec          out(static_cast<size_t>(s.n_q * s.n_head * hd), 0.0);
    for (int64_t i = 0; i < s.n_q; ++i)
        for (int64_t h = 0; h < s.n_head; ++h) {
            const int64_t p = s.q_pos0 + i, hk = h / group;
            const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, p - s.window + 1) : 0;
            dvec          w(static_cast<size_t>(s.n_kv), 0.0);
            double        m = -INFINITY, sum = 0;
            for (int64_t j = j0; j <= p; ++j) {
                double d = 0;
                for (int64_t c = 0; c < hd; ++c)
                    d += q[static_cast<size_t>((i * s.n_head + h) * hd + c)] *
                         k[static_cast<size_t>((j * s.n_head_kv + hk) * hd + c)];
                w[static_cast<size_t>(j)] = d * s.scale;
                m                         = std::max(m, d * s.scale);
            }
            for (int64_t j = j0; j <= p; ++j)
                sum += (w[static_cast<size_t>(j)] = std::exp(w[static_cast<size_t>(j)] - m));
            for (int64_t j = j0; j <= p; ++j)
                for (int64_t c = 0; c < hd; ++c)
                    out[static_cast<size_t>((i * s.n_head + h) * hd + c)] +=
                        w[static_cast<size_t>(j)] / sum * v[static_cast<size_t>((j * s.n_head_kv + hk) * hd + c)];
        }
    return out;
}

cpu::attention_shape att_shape(int64_t n_q, int64_t n_kv, int64_t n_head, int64_t n_head_kv, int64_t hd,
                               int64_t window) {
    cpu::attention_shape s;
    s.n_q       = n_q;
    s.n_kv      = n_kv;
    s.q_pos0    = n_kv - n_q;
    s.n_head    = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim  = hd;
    s.window    = window;
    s.scale     = 1.0f / std::sqrt(static_cast<float>(hd));
    s.q_stride = s.out_stride = n_head * hd;
    s.kv_stride               = n_head_kv * hd;
    return s;
}

}  // namespace

TEST(backward_ops, rms_norm_matches_finite_differences) {
    std::mt19937 rng(1);
    thread_pool  pool(3);
    for (auto [rows, dim] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {5, 64}}) {
        const float        eps = 1e-5f;
        auto               x = randn(static_cast<size_t>(rows * dim), rng), w = randn(static_cast<size_t>(dim), rng);
        auto               dy = randn(x.size(), rng);
        std::vector<float> dx(x.size());
        ops_context        ctx;
        ctx.pool = &pool;
        op_rms_norm_backward(ctx, x.data(), w.data(), dy.data(), dx.data(), rows, dim, eps);
        auto fwd = [&](const dvec& xd) {
            dvec y(xd.size());
            for (int64_t r = 0; r < rows; ++r) {
                double ss = 0;
                for (int64_t j = 0; j < dim; ++j) ss += xd[size_t(r * dim + j)] * xd[size_t(r * dim + j)];
                const double rs = 1.0 / std::sqrt(ss / dim + eps);
                for (int64_t j = 0; j < dim; ++j) y[size_t(r * dim + j)] = w[size_t(j)] * xd[size_t(r * dim + j)] * rs;
            }
            return dot(y, dy);
        };
        EXPECT_LT(rel_err(dx, numeric_grad(x, fwd)), k_fd_tol) << rows << "x" << dim;
        std::vector<float> alias = dy;  // dx may alias dy
        op_rms_norm_backward(ctx, x.data(), w.data(), alias.data(), alias.data(), rows, dim, eps);
        EXPECT_EQ(alias, dx);
    }
}

TEST(backward_ops, silu_mul_matches_finite_differences) {
    std::mt19937       rng(2);
    const size_t       n    = 37;
    auto               gate = randn(n, rng, 3.0f), up = randn(n, rng), dy = randn(n, rng);
    std::vector<float> dg(n), du(n);
    op_silu_mul_backward(ops_context{}, gate.data(), up.data(), dy.data(), dg.data(), du.data(),
                         static_cast<int64_t>(n));
    auto loss_g = [&](const dvec& g) {
        dvec y(n);
        for (size_t i = 0; i < n; ++i) y[i] = g[i] / (1 + std::exp(-g[i])) * up[i];
        return dot(y, dy);
    };
    auto loss_u = [&](const dvec& u) {
        dvec y(n);
        for (size_t i = 0; i < n; ++i) y[i] = gate[i] / (1 + std::exp(-static_cast<double>(gate[i]))) * u[i];
        return dot(y, dy);
    };
    EXPECT_LT(rel_err(dg, numeric_grad(gate, loss_g)), k_fd_tol);
    EXPECT_LT(rel_err(du, numeric_grad(up, loss_u)), k_fd_tol);
    // In place, as the layer's backward runs it: dgate over dy, dup over up.
    std::vector<float> d2 = dy, u2 = up;
    op_silu_mul_backward(ops_context{}, gate.data(), u2.data(), d2.data(), d2.data(), u2.data(),
                         static_cast<int64_t>(n));
    EXPECT_EQ(d2, dg);
    EXPECT_EQ(u2, du);
}

TEST(backward_ops, rope_is_the_transposed_rotation) {
    std::mt19937       rng(3);
    const int64_t      n = 5, heads = 3, hd = 8, half = hd / 2, stride = heads * hd + 2;  // padded rows
    std::vector<float> inv(static_cast<size_t>(half)), cs(size_t(n * half)), sn(cs.size());
    for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::pow(10000.0f, -2.0f * i / hd);
    op_rope_tables(inv.data(), half, 3, n, 1.0f, cs.data(), sn.data());
    auto x = randn(size_t(n * stride), rng), dy = randn(x.size(), rng);
    for (int64_t t = 0; t < n; ++t)  // padding columns carry no gradient
        for (int64_t c = heads * hd; c < stride; ++c) dy[size_t(t * stride + c)] = 0.0f;
    std::vector<float> dx = dy;
    op_rope_backward(ops_context{}, dx.data(), cs.data(), sn.data(), n, heads, hd, stride);
    auto fwd = [&](const dvec& xd) {
        dvec y = xd;
        for (int64_t t = 0; t < n; ++t)
            for (int64_t h = 0; h < heads; ++h)
                for (int64_t i = 0; i < half; ++i) {
                    const size_t a = size_t(t * stride + h * hd + i), b = a + size_t(half);
                    const double c = cs[size_t(t * half + i)], s = sn[size_t(t * half + i)];
                    y[a] = xd[a] * c - xd[b] * s;
                    y[b] = xd[b] * c + xd[a] * s;
                }
        return dot(y, dy);
    };
    EXPECT_LT(rel_err(dx, numeric_grad(x, fwd)), k_fd_tol);
}

TEST(backward_ops, attention_matches_finite_differences_and_reference) {
    std::mt19937 rng(4);
    thread_pool  pool(3);
    struct cfg {
        int64_t n_q, n_kv, n_head, n_head_kv, hd, window;
    };
    for (const cfg c : {cfg{1, 1, 1, 1, 4, 0}, cfg{5, 5, 4, 2, 8, 0}, cfg{6, 9, 3, 3, 4, 0}, cfg{7, 7, 4, 1, 6, 3},
                        cfg{33, 33, 4, 2, 16, 0}, cfg{70, 70, 2, 1, 64, 20}}) {
        const auto         s = att_shape(c.n_q, c.n_kv, c.n_head, c.n_head_kv, c.hd, c.window);
        auto               q = randn(size_t(c.n_q * c.n_head * c.hd), rng), dout = randn(q.size(), rng);
        auto               k = randn(size_t(c.n_kv * c.n_head_kv * c.hd), rng), v = randn(k.size(), rng);
        std::vector<float> dq(q.size()), dk(k.size()), dv(k.size()), rq(q.size()), rk(k.size()), rv(k.size());
        cpu::attention_backward(q.data(), k.data(), v.data(), dout.data(), dq.data(), dk.data(), dv.data(), s, &pool);
        cpu::attention_backward_ref(q.data(), k.data(), v.data(), dout.data(), rq.data(), rk.data(), rv.data(), s);
        const std::string what = "n_q " + std::to_string(c.n_q) + " n_kv " + std::to_string(c.n_kv) + " heads " +
                                 std::to_string(c.n_head) + "/" + std::to_string(c.n_head_kv) + " window " +
                                 std::to_string(c.window);
        EXPECT_LT(rel_err(dq, rq), k_ref_tol) << what;
        EXPECT_LT(rel_err(dk, rk), k_ref_tol) << what;
        EXPECT_LT(rel_err(dv, rv), k_ref_tol) << what;
        if (c.n_q > 10) continue;  // finite differences on the small shapes (each entry two forwards)
        const dvec qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end());
        EXPECT_LT(rel_err(dq, numeric_grad(q, [&](const dvec& x) { return dot(attention_fwd(x, kd, vd, s), dout); })),
                  k_fd_tol)
            << what;
        EXPECT_LT(rel_err(dk, numeric_grad(k, [&](const dvec& x) { return dot(attention_fwd(qd, x, vd, s), dout); })),
                  k_fd_tol)
            << what;
        EXPECT_LT(rel_err(dv, numeric_grad(v, [&](const dvec& x) { return dot(attention_fwd(qd, kd, x, s), dout); })),
                  k_fd_tol)
            << what;
    }
}

namespace {
// dy[m, n] W[n, k] in double.
std::vector<float> dyw(const std::vector<float>& dy, const std::vector<float>& w, int64_t m, int64_t n, int64_t k) {
    std::vector<float> out(size_t(m * k));
    for (int64_t i = 0; i < m; ++i)
        for (int64_t c = 0; c < k; ++c) {
            double s = 0;
            for (int64_t j = 0; j < n; ++j) s += static_cast<double>(dy[size_t(i * n + j)]) * w[size_t(j * k + c)];
            out[size_t(i * k + c)] = static_cast<float>(s);
        }
    return out;
}
}  // namespace

TEST(backward_ops, linear_input_gradients_dense_f16_gptq) {
    std::mt19937 rng(5);
    thread_pool  pool(3);
    ops_context  ctx;
    ctx.pool = &pool;
    // n = 300 output rows: two weight blocks of the blockwise products (256 rows each).
    for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 17, 9}, {5, 300, 96}}) {
        auto                  dy = randn(size_t(m * n), rng), w = randn(size_t(n * k), rng);
        std::vector<uint16_t> w16(w.size());
        f32_to_f16_row(w.data(), w16.data(), w.size());
        std::vector<float> w16f(w.size());
        f16_to_f32_row(w16.data(), w16f.data(), w.size());
        std::vector<float> dx(size_t(m * k));
        op_linear_backward_input(ctx, dy.data(), w.data(), dx.data(), m, n, k, false);
        EXPECT_LT(rel_err(dx, dyw(dy, w, m, n, k)), k_ref_tol);
        op_linear_f16_backward_input(ctx, dy.data(), w16.data(), dx.data(), m, n, k, false);
        EXPECT_LT(rel_err(dx, dyw(dy, w16f, m, n, k)), k_ref_tol);
        // accumulate adds to what dx holds
        std::vector<float> acc(dx.size(), 1.0f), want = dyw(dy, w16f, m, n, k);
        for (float& x : want) x += 1.0f;
        op_linear_f16_backward_input(ctx, dy.data(), w16.data(), acc.data(), m, n, k, true);
        EXPECT_LT(rel_err(acc, want), k_ref_tol);
    }
    // GPTQ, 4 and 3 bits, act-order groups of 32 over 96 inputs, 300 outputs.
    for (int bits : {4, 3}) {
        const int64_t        n_out = 300, n_in = 96, gs = 32, n_groups = n_in / gs, m = 4;
        std::vector<uint8_t> codes(size_t(n_out * n_in));
        for (auto& c : codes) c = static_cast<uint8_t>(rng() % (1u << bits));
        std::vector<float>   scales(size_t(n_groups * n_out));
        std::vector<int32_t> zeros(scales.size()), g_idx(static_cast<size_t>(n_in));
        for (auto& s : scales) s = 0.001f + 0.05f * static_cast<float>(rng() % 1000) / 1000.0f;
        for (auto& z : zeros) z = static_cast<int32_t>(rng() % (1u << bits));
        for (int64_t i = 0; i < n_in; ++i) g_idx[size_t(i)] = static_cast<int32_t>(i / gs);
        std::shuffle(g_idx.begin(), g_idx.end(), rng);
        const gptq_packed_linear q = gptq_packed_linear::from_unpacked(codes.data(), scales.data(), zeros.data(),
                                                                       g_idx.data(), n_out, n_in, n_groups, bits);
        std::vector<float>       w(size_t(n_out * n_in));
        q.dequantize(w.data());
        auto               dy = randn(size_t(m * n_out), rng);
        std::vector<float> dx(size_t(m * n_in));
        op_gptq_linear_backward_input(ctx, dy.data(), q, dx.data(), m, false);
        EXPECT_LT(rel_err(dx, dyw(dy, w, m, n_out, n_in)), k_ref_tol) << bits << " bits";
        // and W is what the forward multiplies: x W^T with the same dequantization
        std::vector<float> wt(static_cast<size_t>(n_in * 3));
        q.dequantize_rows(5, 8, wt.data());
        for (int64_t c = 0; c < n_in; ++c) EXPECT_EQ(wt[size_t(c)], w[size_t(5 * n_in + c)]);
    }
}
