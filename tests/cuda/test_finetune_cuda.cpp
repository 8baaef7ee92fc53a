// LoRA training on the GPU (issue 21 Part 2, docs/lora.md "Fine-tuning on the GPU") against the CPU
// training path, which test_finetune checks against peft (so these are the peft goldens
// transitively):
// - each training op of ops/ops_cuda_train.h against its CPU op (ops.h / ops_backward.h) on random
//   inputs over several shapes (odd lengths and widths, GQA groups, a sliding window, a row stride
//   past the heads); the GPTQ dequantization to F32 bit for bit (2/3/4/8 bits, act-order, v1/v2);
//   the row-major sgemm with each transpose and a batch;
// - one whole lora_loss_grad on tiny-llama, FP16 and a W4 act-order GPTQ checkpoint, ragged batch
//   with masked rows: the loss and every A and B gradient against llama_model::lora_loss_grad
//   (plain F32 products; TF32 and BF16 with their own bounds), with LoRA dropout too (the same masks);
// - gptq finetune --device cuda: 2 steps + resume bit-identical to 4 uninterrupted ones, and a
//   3-step run's losses and adapter against the same run on the CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda_model_util.h"
#include "cuda_test_util.h"
#include "engine/finetune_train.h"
#include "gptq/finetune.h"
#include "gptq_test_layer.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "model/lora.h"
#include "ops/linalg.h"
#include "ops/ops.h"
#include "ops/ops_backward.h"
#include "ops/ops_cuda_train.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;
namespace fs = std::filesystem;

namespace {

// Element-wise ops and norms: F32 on both sides, the same formulas; expf and the reduction order
// differ (a few ulps of the largest value).
constexpr double k_elem_tol = 1e-5;
// Attention and products in plain F32 against the CPU's sgemms (different summation orders over up
// to 70 keys / 300 columns): max |gpu - cpu| / max |cpu| per output.
constexpr double k_prod_tol = 1e-5;
// A whole loss + backward through tiny-llama's 4 layers in plain F32: the loss within 1e-5
// relative, each A and B gradient within 1e-4 of its tensor's largest (test_finetune's bound
// against peft, whose arithmetic differs from ours as much as the GPU's does).
constexpr double k_loss_tol = 1e-5;
constexpr double k_grad_tol = 1e-4;
// The same with the base's products on TF32 tensor cores (10-bit mantissa inputs): 1e-3 of the
// loss, 2e-2 of each gradient tensor's largest; BF16 operands (8-bit mantissas, 4x TF32's
// rounding): 4e-3 and 8e-2.
constexpr double k_loss_tol_tf32 = 1e-3;
constexpr double k_grad_tol_tf32 = 2e-2;
constexpr double k_loss_tol_bf16 = 4e-3;
constexpr double k_grad_tol_bf16 = 8e-2;

std::unique_ptr<cuda_context> make_ctx() {
    auto c = cuda_context::create(0);
    EXPECT_TRUE(c.is_ok()) << c.error().message();
    return c ? std::move(*c) : nullptr;
}

std::vector<float> randn(std::mt19937& rng, size_t n, float sd = 1.0f) {
    std::normal_distribution<float> d(0.0f, sd);
    std::vector<float>              v(n);
    for (float& x : v) x = d(rng);
    return v;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
    EXPECT_EQ(got.size(), want.size());
    double d = 0, m = 1e-30;
    for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
        d = std::max(d, std::fabs(double(got[i]) - want[i]));
        if (!std::isfinite(got[i])) d = INFINITY;
        m = std::max(m, std::fabs(double(want[i])));
    }
    return d / m;
}

// Device copies of host vectors.
template <typename T>
std::unique_ptr<device_array<T>> dev(const std::vector<T>& v) {
    return std::make_unique<device_array<T>>(v);
}

}  // namespace

TEST(finetune_cuda, rms_norm_forward_and_backward_match_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto              c    = make_ctx();
    const uint32_t    seed = fresh_seed();
    std::mt19937      rng(seed);
    const ops_context cpu{};
    for (auto [rows, dim] : std::vector<std::pair<int64_t, int64_t>>{{1, 7}, {5, 64}, {33, 1000}, {3, 4099}}) {
        SCOPED_TRACE("rows " + std::to_string(rows) + " dim " + std::to_string(dim) + " seed " + std::to_string(seed));
        const float              eps = 1e-5f;
        const std::vector<float> x = randn(rng, size_t(rows * dim)), dy = randn(rng, size_t(rows * dim));
        const auto               w16 = random_f16(rng, size_t(dim));
        const std::vector<float> w   = to_f32(w16);
        std::vector<float>       y(x.size()), dx(x.size());
        op_rms_norm(cpu, x.data(), w.data(), y.data(), rows, dim, eps);
        op_rms_norm_backward(cpu, x.data(), w.data(), dy.data(), dx.data(), rows, dim, eps);
        auto dx_ = dev(x), ddy = dev(dy);
        auto dw     = dev(w16);
        auto dy_out = std::make_unique<device_array<float>>(x.size());
        GPTQ_EXPECT_OK(op_cuda_rms_norm_f32(*c, dx_->get(), dw->get(), dy_out->get(), rows, dim, eps));
        EXPECT_LT(rel_err(dy_out->download(), y), k_elem_tol);
        // dx in place over dy (the model's use).
        GPTQ_EXPECT_OK(
            op_cuda_rms_norm_backward_f32(*c, dx_->get(), dw->get(), ddy->get(), ddy->get(), rows, dim, eps));
        EXPECT_LT(rel_err(ddy->download(), dx), k_elem_tol);
    }
}

TEST(finetune_cuda, rope_silu_add_match_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto              c    = make_ctx();
    const uint32_t    seed = fresh_seed();
    std::mt19937      rng(seed);
    const ops_context cpu{};
    // RoPE forward and backward: (tokens, heads, head_dim, row stride past the heads).
    for (auto [nt, nh, hd, extra] : std::vector<std::array<int64_t, 4>>{{1, 1, 2, 0}, {7, 3, 10, 5}, {33, 4, 64, 0}}) {
        SCOPED_TRACE("rope " + std::to_string(nt) + "x" + std::to_string(nh) + "x" + std::to_string(hd) + " seed " +
                     std::to_string(seed));
        const int64_t      half = hd / 2, stride = nh * hd + extra;
        std::vector<float> inv(static_cast<size_t>(half));
        for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::pow(10000.0f, -2.0f * float(i) / float(hd));
        std::vector<float> cs(size_t(nt * half)), sn(cs.size());
        op_rope_tables(inv.data(), half, 0, nt, 1.0f, cs.data(), sn.data());
        for (bool backward : {false, true}) {
            std::vector<float> x = randn(rng, size_t(nt * stride)), want = x;
            if (backward)
                op_rope_backward(cpu, want.data(), cs.data(), sn.data(), nt, nh, hd, stride);
            else
                op_rope(cpu, want.data(), cs.data(), sn.data(), nt, nh, hd, stride);
            auto dx = dev(x), dc = dev(cs), ds = dev(sn);
            GPTQ_EXPECT_OK(op_cuda_rope_f32(*c, dx->get(), dc->get(), ds->get(), nt, nh, hd, stride, backward));
            EXPECT_LT(rel_err(dx->download(), want), k_elem_tol) << "backward " << backward;
        }
    }
    // SiLU-mul forward and backward, the backward in place as the model runs it (dgate over dy,
    // dup over up); x += y; the bias add.
    for (int64_t n : {int64_t(1), int64_t(1001), int64_t(70001)}) {
        SCOPED_TRACE("silu n " + std::to_string(n) + " seed " + std::to_string(seed));
        const std::vector<float> g = randn(rng, size_t(n), 3.0f), u = randn(rng, size_t(n)), dy = randn(rng, size_t(n));
        std::vector<float>       y(static_cast<size_t>(n)), dg(y.size()), du(y.size());
        op_silu_mul(cpu, g.data(), u.data(), y.data(), n);
        op_silu_mul_backward(cpu, g.data(), u.data(), dy.data(), dg.data(), du.data(), n);
        auto dgate = dev(g), dup = dev(u), ddy = dev(dy);
        auto dy_out = std::make_unique<device_array<float>>(static_cast<size_t>(n));
        GPTQ_EXPECT_OK(op_cuda_silu_mul_f32(*c, dgate->get(), dup->get(), dy_out->get(), n));
        EXPECT_LT(rel_err(dy_out->download(), y), k_elem_tol);
        GPTQ_EXPECT_OK(
            op_cuda_silu_mul_backward_f32(*c, dgate->get(), dup->get(), ddy->get(), ddy->get(), dup->get(), n));
        EXPECT_LT(rel_err(ddy->download(), dg), k_elem_tol);
        EXPECT_LT(rel_err(dup->download(), du), k_elem_tol);
        std::vector<float> sum = g;
        op_add(cpu, sum.data(), u.data(), n);
        GPTQ_EXPECT_OK(op_cuda_add_f32(*c, dgate->get(), dy_out->get(), 0));  // n 0: nothing
        auto da = dev(g), db = dev(u);
        GPTQ_EXPECT_OK(op_cuda_add_f32(*c, da->get(), db->get(), n));
        EXPECT_EQ(da->download(), sum);
    }
    {
        const int64_t      rows = 3, n = 37;
        const auto         b16 = random_f16(rng, size_t(n));
        std::vector<float> y = randn(rng, size_t(rows * n)), want = y;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < n; ++i) want[size_t(r * n + i)] += f16_to_f32(b16[size_t(i)]);
        auto dy = dev(y);
        auto db = dev(b16);
        GPTQ_EXPECT_OK(op_cuda_add_bias_f32(*c, dy->get(), db->get(), rows, n));
        EXPECT_EQ(dy->download(), want);
    }
}

TEST(finetune_cuda, embedding_rows_and_cross_entropy_match_reference) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto           c    = make_ctx();
    const uint32_t seed = fresh_seed();
    std::mt19937   rng(seed);
    SCOPED_TRACE("seed " + std::to_string(seed));
    const int64_t              vocab = 301, dim = 19, n = 6;
    const auto                 table = random_f16(rng, size_t(vocab * dim));
    const std::vector<int32_t> ids   = {0, 300, 7, 7, 150, 299};
    auto                       dt    = dev(table);
    auto                       di    = dev(ids);
    device_array<float>        out(size_t(n * dim));
    GPTQ_EXPECT_OK(op_cuda_embedding_f32(*c, dt->get(), di->get(), out.get(), n, vocab, dim));
    std::vector<float> want(size_t(n * dim));
    for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < dim; ++j)
            want[size_t(t * dim + j)] = f16_to_f32(table[size_t(ids[size_t(t)] * dim + j)]);
    EXPECT_EQ(out.download(), want);
    // Gather rows 5, 0, 3 and scatter them back into zeros.
    const std::vector<int32_t> rows = {5, 0, 3};
    auto                       dr   = dev(rows);
    device_array<float>        g(size_t(3 * dim)), s(size_t(n * dim));
    GPTQ_EXPECT_OK(op_cuda_rows_gather_f32(*c, out.get(), dr->get(), g.get(), 3, dim));
    GPTQ_EXPECT_OK(cuda_zero_async(*c, s.get(), size_t(n * dim) * 4));
    GPTQ_EXPECT_OK(op_cuda_rows_scatter_f32(*c, g.get(), dr->get(), s.get(), 3, dim));
    const std::vector<float> gh = g.download(), sh = s.download();
    for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < dim; ++j) {
            EXPECT_EQ(gh[size_t(i * dim + j)], want[size_t(rows[size_t(i)] * dim + j)]);
            EXPECT_EQ(sh[size_t(rows[size_t(i)] * dim + j)], want[size_t(rows[size_t(i)] * dim + j)]);
        }
    EXPECT_EQ(sh[size_t(1 * dim)], 0.0f);  // row 1 not scattered
    // Cross-entropy: vocabularies below, at and past the block, large logits.
    for (int64_t V : {int64_t(5), int64_t(256), int64_t(8193)}) {
        const int64_t        rws = 4;
        std::vector<float>   l   = randn(rng, size_t(rws * V), 8.0f);
        std::vector<int32_t> t(static_cast<size_t>(rws));
        for (int64_t r = 0; r < rws; ++r) t[size_t(r)] = int32_t((r * 7919 + 3) % V);
        const float          scale = 0.125f;
        auto                 dl    = dev(l);
        auto                 dtg   = dev(t);
        device_array<double> nll(static_cast<size_t>(rws));
        GPTQ_EXPECT_OK(op_cuda_cross_entropy_f32(*c, dl->get(), dtg->get(), nll.get(), rws, V, scale, true));
        const std::vector<double> got_nll = nll.download();
        const std::vector<float>  got_g   = dl->download();
        for (int64_t r = 0; r < rws; ++r) {
            const float* lr = l.data() + r * V;
            double       mx = -INFINITY, s = 0;
            for (int64_t j = 0; j < V; ++j) mx = std::max<double>(mx, lr[j]);
            for (int64_t j = 0; j < V; ++j) s += std::exp(double(lr[j]) - mx);
            const double lse = mx + std::log(s);
            EXPECT_NEAR(got_nll[size_t(r)], lse - lr[t[size_t(r)]], 1e-9 * std::fabs(lse) + 1e-12) << "V " << V;
            double err = 0;
            for (int64_t j = 0; j < V; ++j) {
                const double want_g = (std::exp(double(lr[j]) - lse) - (j == t[size_t(r)] ? 1.0 : 0.0)) * scale;
                err                 = std::max(err, std::fabs(got_g[size_t(r * V + j)] - want_g));
            }
            EXPECT_LT(err, 1e-7) << "V " << V << " row " << r;
        }
    }
}

TEST(finetune_cuda, sgemm_matches_cpu_each_transpose) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto              c    = make_ctx();
    const uint32_t    seed = fresh_seed();
    std::mt19937      rng(seed);
    const ops_context cpu{};
    const int64_t     m = 37, n = 19, k = 301;
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            SCOPED_TRACE(std::string("ta ") + (ta ? "1" : "0") + " tb " + (tb ? "1" : "0") + " seed " +
                         std::to_string(seed));
            const int64_t            lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
            const std::vector<float> a = randn(rng, size_t((ta ? k : m) * lda)),
                                     b = randn(rng, size_t((tb ? n : k) * ldb));
            std::vector<float> cc = randn(rng, size_t(m * ldc)), want = cc;
            op_sgemm(cpu, ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 1.0f, want.data(), ldc);
            auto da = dev(a), db = dev(b), dc = dev(cc);
            GPTQ_EXPECT_OK(
                op_cuda_sgemm(*c, ta, tb, m, n, k, 0.5f, da->get(), lda, db->get(), ldb, 1.0f, dc->get(), ldc, false));
            EXPECT_LT(rel_err(dc->download(), want), k_prod_tol);
            GPTQ_EXPECT_OK(op_cuda_sgemm(*c, ta, tb, m, n, k, 0.5f, da->get(), lda, db->get(), ldb, 0.0f, dc->get(),
                                         ldc,
                                         true));  // TF32: k 301 products of 10-bit mantissas
            std::vector<float> w0 = cc;
            op_sgemm(cpu, ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 0.0f, w0.data(), ldc);
            EXPECT_LT(rel_err(dc->download(), w0), 1e-2);
            // BF16 operands (rounded by the conversion op), F32 C: against the CPU on the rounded values.
            device_array<uint16_t> ab(a.size()), bb(b.size());
            GPTQ_EXPECT_OK(op_cuda_f32_to_bf16(*c, da->get(), ab.get(), int64_t(a.size())));
            GPTQ_EXPECT_OK(op_cuda_f32_to_bf16(*c, db->get(), bb.get(), int64_t(b.size())));
            auto               ra = ab.download(), rb = bb.download();
            std::vector<float> af(a.size()), bf(b.size());
            for (size_t i = 0; i < af.size(); ++i) af[i] = bf16_to_f32(ra[i]);
            for (size_t i = 0; i < bf.size(); ++i) bf[i] = bf16_to_f32(rb[i]);
            for (size_t i = 0; i < af.size(); ++i)  // round to nearest: within half a BF16 ulp (2^-9 relative)
                EXPECT_LE(std::fabs(af[i] - a[i]), std::ldexp(std::fabs(a[i]), -8)) << i;
            std::vector<float> w1 = cc;
            op_sgemm(cpu, ta, tb, m, n, k, 0.5f, af.data(), lda, bf.data(), ldb, 1.0f, w1.data(), ldc);
            auto dc2 = dev(cc);
            GPTQ_EXPECT_OK(
                op_cuda_gemm_bf16(*c, ta, tb, m, n, k, 0.5f, ab.get(), lda, bb.get(), ldb, 1.0f, dc2->get(), ldc));
            EXPECT_LT(rel_err(dc2->download(), w1), k_prod_tol);
        }
}

TEST(finetune_cuda, gptq_dequant_f32_is_the_cpu_weight_bit_for_bit) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto           c    = make_ctx();
    const uint32_t seed = fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t                n_out, n_in, group;
        int                    bits;
        bool                   act, sym;
        gptq_checkpoint_format f;
    };
    using F = gptq_checkpoint_format;
    for (const shape& s :
         {shape{64, 96, 32, 4, true, false, F::GPTQ_FORMAT_V1}, shape{96, 128, -1, 4, false, true, F::GPTQ_FORMAT_V2},
          shape{32, 96, 32, 3, true, false, F::GPTQ_FORMAT_V2}, shape{48, 64, 16, 2, false, false, F::GPTQ_FORMAT_V1},
          shape{40, 72, 24, 8, true, true, F::GPTQ_FORMAT_V2}}) {
        const gptq_layer L = gptq_layer_random(rng, s.n_out, s.n_in, s.group, s.bits, s.act, s.sym, s.f);
        SCOPED_TRACE(gptq_layer_describe(L, 0, s.act, s.sym, seed));
        gptq_host_tensors t;
        t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data(), t.g_idx = L.g_idx.data();
        t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups, t.bits = L.bits;
        t.group_size = L.group_size;
        t.zero_add   = L.format == F::GPTQ_FORMAT_V1 ? 1 : 0;
        auto q       = cuda_gptq_linear_load(*c, t, /*allow_fast=*/false);
        ASSERT_TRUE(q.is_ok()) << q.error().message();
        device_array<float> w(size_t(L.n_out * L.n_in));
        GPTQ_EXPECT_OK(op_cuda_gptq_dequant_f32(*c, *q, w.get()));
        const std::vector<float> got = w.download();
        int64_t                  bad = 0;
        for (size_t i = 0; i < got.size(); ++i) bad += got[i] != float(L.w[i]);
        EXPECT_EQ(bad, 0);
        device_array<uint16_t> wb(size_t(L.n_out * L.n_in));  // the BF16 mode's: rounded once
        GPTQ_EXPECT_OK(op_cuda_gptq_dequant_bf16(*c, *q, wb.get()));
        const std::vector<uint16_t> gb = wb.download();
        bad                            = 0;
        for (size_t i = 0; i < gb.size(); ++i) bad += gb[i] != f32_to_bf16(float(L.w[i]));
        EXPECT_EQ(bad, 0);
    }
    // The fast int4 layout keeps no checkpoint order: refused by name.
    const gptq_layer  L = gptq_layer_random(rng, 64, 128, 32, 4, false, true, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    gptq_host_tensors t;
    t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data(), t.g_idx = L.g_idx.data();
    t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups, t.bits = 4, t.group_size = 32;
    auto q = cuda_gptq_linear_load(*c, t, true);
    ASSERT_TRUE(q.is_ok());
    if (q->fast) {
        device_array<float> w(size_t(64 * 128));
        const status        st = op_cuda_gptq_dequant_f32(*c, *q, w.get());
        ASSERT_FALSE(st.is_ok());
        EXPECT_NE(st.message().find("fast int4 layout"), std::string::npos) << st.message();
    }
}

namespace {
struct attn_case {
    int64_t n, n_head, n_head_kv, head_dim, window, q_pos0;
};
}  // namespace

TEST(finetune_cuda, attention_forward_and_backward_match_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto              c    = make_ctx();
    const uint32_t    seed = fresh_seed();
    std::mt19937      rng(seed);
    const ops_context cpu{};
    // One token; GQA groups of 2 and 3; MHA; a 5-token window; queries after cached keys; 70 tokens.
    for (const attn_case& t :
         {attn_case{1, 2, 1, 4, 0, 0}, attn_case{7, 4, 2, 8, 0, 0}, attn_case{33, 6, 2, 16, 0, 0},
          attn_case{19, 3, 3, 10, 0, 0}, attn_case{70, 8, 2, 16, 5, 0}, attn_case{9, 4, 1, 8, 0, 6}}) {
        SCOPED_TRACE("n " + std::to_string(t.n) + " heads " + std::to_string(t.n_head) + "/" +
                     std::to_string(t.n_head_kv) + " hd " + std::to_string(t.head_dim) + " window " +
                     std::to_string(t.window) + " q_pos0 " + std::to_string(t.q_pos0) + " seed " +
                     std::to_string(seed));
        const int64_t            nkv = t.n + t.q_pos0, qd = t.n_head * t.head_dim, kvd = t.n_head_kv * t.head_dim;
        const int64_t            qs = qd + 3, kvs = kvd + 1, os = qd + 2;  // strides past the heads
        const std::vector<float> q = randn(rng, size_t(t.n * qs)), k = randn(rng, size_t(nkv * kvs)),
                                 v = randn(rng, size_t(nkv * kvs)), dout = randn(rng, size_t(t.n * os));
        attention_args a;
        a.q = q.data(), a.k = k.data(), a.v = v.data();
        a.n_q = t.n, a.n_kv = nkv, a.q_pos0 = t.q_pos0, a.n_head = t.n_head, a.n_head_kv = t.n_head_kv;
        a.head_dim = t.head_dim, a.window = t.window, a.scale = 1.0f / std::sqrt(float(t.head_dim));
        a.q_stride = qs, a.kv_stride = kvs, a.out_stride = os;
        std::vector<float> out(size_t(t.n * os), 0.0f), dq(size_t(t.n * qs), 0.0f), dk(size_t(nkv * kvs), 0.0f),
            dv(dk.size(), 0.0f);
        a.out = out.data();
        op_attention(cpu, a);
        op_attention_backward(cpu, a, dout.data(), dq.data(), dk.data(), dv.data());

        auto dq_ = dev(q), dk_ = dev(k), dv_ = dev(v), ddo = dev(dout);
        auto gout = dev(std::vector<float>(out.size(), 0.0f)), gdq = dev(std::vector<float>(dq.size(), 0.0f));
        auto gdk = dev(std::vector<float>(dk.size(), 0.0f)), gdv = dev(std::vector<float>(dv.size(), 0.0f));
        cuda_attention_f32_args g;
        g.q = dq_->get(), g.k = dk_->get(), g.v = dv_->get(), g.out = gout->get();
        g.n_q = t.n, g.n_kv = nkv, g.q_pos0 = t.q_pos0, g.n_head = t.n_head, g.n_head_kv = t.n_head_kv;
        g.head_dim = t.head_dim, g.window = t.window, g.scale = a.scale;
        g.q_stride = qs, g.kv_stride = kvs, g.out_stride = os;
        GPTQ_EXPECT_OK(op_cuda_attention_f32(*c, g));
        GPTQ_EXPECT_OK(op_cuda_attention_backward_f32(*c, g, ddo->get(), gdq->get(), gdk->get(), gdv->get()));
        EXPECT_LT(rel_err(gout->download(), out), k_prod_tol) << "out";
        EXPECT_LT(rel_err(gdq->download(), dq), k_prod_tol) << "dq";
        EXPECT_LT(rel_err(gdk->download(), dk), k_prod_tol) << "dk";
        EXPECT_LT(rel_err(gdv->download(), dv), k_prod_tol) << "dv";
    }
}

// ---- the whole model ---------------------------------------------------------------------------

namespace {

std::string tiny_fp16() {
    return cuda_source_dir() + "/models/tiny-llama";
}
std::string tiny_w4_act() {
    return tiny_llama_gptq_checkpoint("w4g32-act-asym", 4, 32, true, false, "gptq");
}

// Three sequences (odd lengths), the last rows and a few inside without a target.
train_batch ragged_batch(int64_t vocab) {
    train_batch  b;
    std::mt19937 rng(17);
    for (int64_t nt : {int64_t(13), int64_t(1), int64_t(30)}) {
        for (int64_t i = 0; i < nt; ++i) {
            b.ids.push_back(int32_t(rng() % uint32_t(vocab)));
            b.targets.push_back(i + 1 < nt && i % 5 != 2 ? int32_t(rng() % uint32_t(vocab)) : -1);
        }
        b.n_tokens.push_back(nt);
    }
    return b;
}

// PEFT's init with a random B too (so that A gets gradients), r 4 on every role.
std::shared_ptr<lora_adapter> random_adapter(const llama_hparams& hp) {
    std::array<bool, k_n_linear_roles> on;
    on.fill(true);
    auto         a = std::make_shared<lora_adapter>(lora_adapter_init(hp, 4, 2.0f, on, 3));
    std::mt19937 rng(9);
    for (auto& layer : a->layers)
        for (lora_module& m : layer)
            for (float& x : m.b) x = std::normal_distribution<float>(0.0f, 0.05f)(rng);
    return a;
}

void check_step(const std::string& path, cuda_train_math math, lora_dropout_spec drop = {}) {
    const char*        name = math == cuda_train_math::F32 ? "f32" : math == cuda_train_math::TF32 ? "tf32" : "bf16";
    const double       loss_tol = math == cuda_train_math::F32    ? k_loss_tol
                                  : math == cuda_train_math::TF32 ? k_loss_tol_tf32
                                                                  : k_loss_tol_bf16;
    const double       grad_tol = math == cuda_train_math::F32    ? k_grad_tol
                                  : math == cuda_train_math::TF32 ? k_grad_tol_tf32
                                                                  : k_grad_tol_bf16;
    llama_open_options oo;
    oo.keep_f16 = true;
    auto cpu    = llama_model::open(path, oo);
    ASSERT_TRUE(cpu) << cpu.error().message();
    const llama_hparams& hp      = (*cpu)->hparams();
    auto                 adapter = random_adapter(hp);
    const train_batch    b       = ragged_batch(hp.n_vocab);
    const float          scale   = 1.0f / float(b.n_targets());
    const int32_t        idx     = (*cpu)->lora_add(adapter);
    lora_adapter         g_cpu   = lora_adapter_zeros_like(*adapter);
    auto                 l_cpu   = (*cpu)->lora_loss_grad(ops_context{}, b, idx, &g_cpu, scale, drop);
    ASSERT_TRUE(l_cpu) << l_cpu.error().message();

    auto gpu = llama_cuda_model::open(path, llama_cuda_train_options());
    ASSERT_TRUE(gpu) << gpu.error().message();
    (*gpu)->set_train_math(math);
    lora_adapter g_gpu = lora_adapter_zeros_like(*adapter);
    auto         l_gpu = (*gpu)->lora_loss_grad(b, *adapter, &g_gpu, scale, drop);
    ASSERT_TRUE(l_gpu) << l_gpu.error().message();
    EXPECT_NEAR(*l_gpu, *l_cpu, loss_tol * std::fabs(*l_cpu)) << "loss";
    double worst = 0;
    for (size_t l = 0; l < g_cpu.layers.size(); ++l)
        for (size_t r = 0; r < g_cpu.layers[l].size(); ++r) {
            const lora_module &gc = g_cpu.layers[l][r], &gg = g_gpu.layers[l][r];
            if (gc.r == 0) continue;
            const std::string name = llama_linear_name(int64_t(l), linear_role(r));
            const double      ea = rel_err(gg.a, gc.a), eb = rel_err(gg.b, gc.b);
            EXPECT_LT(ea, grad_tol) << name << " A";
            EXPECT_LT(eb, grad_tol) << name << " B";
            worst = std::max({worst, ea, eb});
        }
    if (drop.p > 0) std::printf("(lora dropout %.2f) ", drop.p);
    std::printf("%s math %s: loss cpu %.9g gpu %.9g (rel %.2e), worst gradient error %.2e of its tensor's largest\n",
                path.c_str(), name, *l_cpu, *l_gpu, std::fabs(*l_gpu - *l_cpu) / std::fabs(*l_cpu), worst);
    // A second call accumulates (the trainer's micro-batches), and eval (no gradients) gives the loss.
    auto l2 = (*gpu)->lora_loss_grad(b, *adapter, &g_gpu, scale, drop);
    ASSERT_TRUE(l2);
    EXPECT_EQ(*l2, *l_gpu);  // the same arithmetic on the same inputs
    EXPECT_LT(rel_err(g_gpu.layers[0][0].a,
                      [&] {
                          std::vector<float> twice = g_cpu.layers[0][0].a;
                          for (float& x : twice) x *= 2.0f;
                          return twice;
                      }()),
              2 * grad_tol);
    auto le = (*gpu)->lora_loss_grad(b, *adapter, nullptr, 1.0f, drop);
    ASSERT_TRUE(le);
    EXPECT_EQ(*le, *l_gpu);
}

}  // namespace

TEST(finetune_cuda, one_step_matches_cpu_fp16_base) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (cuda_train_math m : {cuda_train_math::F32, cuda_train_math::TF32, cuda_train_math::BF16})
        check_step(tiny_fp16(), m);
}

TEST(finetune_cuda, one_step_matches_cpu_w4_act_order_base) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (cuda_train_math m : {cuda_train_math::F32, cuda_train_math::TF32, cuda_train_math::BF16})
        check_step(tiny_w4_act(), m);
}

namespace {
// tests/data/arch/mistral-nemo (3 layers, GQA 4/2, head_dim 16, untied lm_head, BF16) with every
// tensor stored as F16 (so that the GPU, which holds F16, and the CPU run the same values), as
// Mistral with a 5-token sliding window, or as Qwen2 with random F16 q/k/v biases.
std::string arch_copy_f16(const temp_dir& d, bool qwen2) {
    const std::string src = cuda_source_dir() + "/tests/data/arch/mistral-nemo";
    auto              cfg = nlohmann::json::parse(read_file(src + "/config.json"));
    cfg["dtype"]          = "float16";
    if (qwen2) {
        cfg["architectures"]      = {"Qwen2ForCausalLM"};
        cfg["model_type"]         = "qwen2";
        cfg["use_sliding_window"] = false;
        cfg.erase("sliding_window");
    } else {
        cfg["sliding_window"] = 5;
    }
    write_file(d.file("config.json"), cfg.dump());
    auto f = safetensors_file::open(src + "/model.safetensors");
    EXPECT_TRUE(f) << f.error().message();
    std::vector<safetensors_decl>      decls;
    std::vector<std::vector<uint16_t>> data;
    for (const auto& t : (*f)->tensors()) {
        decls.push_back({t.name, dtype::DTYPE_F16, t.shape});
        std::vector<float> v(static_cast<size_t>(t.numel()));
        EXPECT_TRUE((*f)->read_f32(t, v.data()).is_ok());
        data.emplace_back(v.size());
        for (size_t i = 0; i < v.size(); ++i) data.back()[i] = f32_to_f16(v[i]);
    }
    if (qwen2) {
        const int64_t kv = cfg["num_key_value_heads"].get<int64_t>() * cfg["head_dim"].get<int64_t>();
        const int64_t q  = cfg["num_attention_heads"].get<int64_t>() * cfg["head_dim"].get<int64_t>();
        std::mt19937  rng(12);
        for (int64_t l = 0; l < cfg["num_hidden_layers"].get<int64_t>(); ++l)
            for (auto [r, n] : {std::pair{"q_proj", q}, std::pair{"k_proj", kv}, std::pair{"v_proj", kv}}) {
                decls.push_back(
                    {"model.layers." + std::to_string(l) + ".self_attn." + r + ".bias", dtype::DTYPE_F16, {n}});
                data.push_back(random_f16(rng, size_t(n), 0.5f));
            }
    }
    auto w = safetensors_writer::create(d.file("model.safetensors"), decls);
    EXPECT_TRUE(w) << w.error().message();
    for (size_t i = 0; i < decls.size(); ++i)
        EXPECT_TRUE((*w)->write(decls[i].name, data[i].data(), data[i].size() * 2).is_ok());
    EXPECT_TRUE((*w)->finish().is_ok());
    return d.path();
}
}  // namespace

TEST(finetune_cuda, one_step_matches_cpu_window_untied_head_and_biases) {
    GPTQ_SKIP_WITHOUT_GPU();
    temp_dir          mistral("ft-cuda-mistral"), qwen2("ft-cuda-qwen2");
    const std::string pm = arch_copy_f16(mistral, false), pq = arch_copy_f16(qwen2, true);
    auto              m = llama_model::open(pm);
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ((*m)->hparams().window[0], 5);
    check_step(pm, cuda_train_math::F32);
    check_step(pq, cuda_train_math::F32);
}

// LoRA dropout: the GPU draws the CPU's masks (core/dropout_mask.h), so the step matches as without.
TEST(finetune_cuda, one_step_matches_cpu_with_lora_dropout) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_step(tiny_fp16(), cuda_train_math::F32, {0.3, 1234});
    check_step(tiny_w4_act(), cuda_train_math::F32, {0.1, 99});
}

TEST(finetune_cuda, model_opened_for_inference_is_refused_by_name) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto gpu = llama_cuda_model::open(tiny_w4_act(), llama_cuda_options{});  // fused, fast int4 layout
    ASSERT_TRUE(gpu) << gpu.error().message();
    auto adapter = random_adapter((*gpu)->hparams());
    auto r       = (*gpu)->lora_loss_grad(ragged_batch((*gpu)->hparams().n_vocab), *adapter, nullptr, 1.0f);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("llama_cuda_train_options"), std::string::npos) << r.error().message();
}

// ---- gptq finetune --device cuda ---------------------------------------------------------------

namespace {
std::string river_text() {
    std::string t;
    for (int i = 0; i < 40; ++i)
        t += "The river " + std::to_string(i) + " flows past the old mill, and the miller counts the sacks. ";
    return t;
}

finetune_params gpu_params(const std::string& model, const std::string& data, const std::string& out) {
    finetune_params p;
    p.model_path = model;
    p.data_path  = data;
    p.out_dir    = out;
    p.r          = 4;
    p.alpha      = 8;
    p.seqlen     = 32;
    p.batch      = 2;
    p.lr         = 1e-3;
    p.n_threads  = 2;
    p.progress   = false;
    p.device     = "cuda";
    return p;
}

lora_adapter read_adapter(const std::string& dir, const llama_hparams& hp) {
    auto a = lora_adapter_load(dir, hp, 1.0f);
    EXPECT_TRUE(a) << a.error().message();
    return a ? std::move(*a) : lora_adapter{};
}
}  // namespace

TEST(finetune_cuda, resume_equals_an_uninterrupted_run) {
    GPTQ_SKIP_WITHOUT_GPU();
    temp_dir d("ft-cuda-resume");
    write_file(d.file("data.txt"), river_text());
    finetune_params p = gpu_params(tiny_w4_act(), d.file("data.txt"), d.file("full"));
    p.max_steps       = 4;
    p.save_every      = 2;
    auto full         = finetune_run(p);
    ASSERT_TRUE(full) << full.error().message();
    EXPECT_EQ(full->steps, 4);
    EXPECT_GT(full->device_used_bytes, 0u);
    p.out_dir = d.file("cut");
    ASSERT_TRUE(finetune_run(p));
    fs::remove(d.file("cut/adapter_config.json"));
    fs::remove(d.file("cut/adapter_model.safetensors"));
    p.resume     = true;
    auto resumed = finetune_run(p);
    ASSERT_TRUE(resumed) << resumed.error().message();
    EXPECT_EQ(resumed->steps, 2);
    // The same kernels on the same inputs: bit for bit.
    EXPECT_EQ(read_file(d.file("full/adapter_model.safetensors")), read_file(d.file("cut/adapter_model.safetensors")));
}

TEST(finetune_cuda, three_steps_match_the_cpu_run) {
    GPTQ_SKIP_WITHOUT_GPU();
    temp_dir d("ft-cuda-vs-cpu");
    write_file(d.file("data.txt"), river_text());
    const std::vector<std::string> models = {tiny_fp16(), tiny_w4_act()};
    for (size_t mi = 0; mi < models.size(); ++mi) {
        const std::string& model = models[mi];
        SCOPED_TRACE(model);
        finetune_params p = gpu_params(model, d.file("data.txt"), d.file("gpu-" + std::to_string(mi)));
        p.max_steps       = 3;
        p.eval_fraction   = 0.2;
        p.gpu_math        = "f32";
        p.lr              = 5e-3;  // two updates (the first step warms up from 0): a visible drop
        auto g            = finetune_run(p);
        ASSERT_TRUE(g) << g.error().message();
        p.device  = "cpu";
        p.out_dir = d.file("cpu-" + std::to_string(mi));
        auto c    = finetune_run(p);
        ASSERT_TRUE(c) << c.error().message();
        std::printf("%s: train loss cpu %.7f gpu %.7f, eval %.7f -> %.7f (cpu) %.7f -> %.7f (gpu)\n", model.c_str(),
                    c->train_loss, g->train_loss, c->eval_loss_first, c->eval_loss, g->eval_loss_first, g->eval_loss);
        ASSERT_EQ(g->step_losses.size(), c->step_losses.size());
        for (size_t i = 0; i < c->step_losses.size(); ++i)  // the loss curve
            EXPECT_NEAR(g->step_losses[i], c->step_losses[i], 1e-4 * c->step_losses[i]) << "step " << i;
        EXPECT_NEAR(g->eval_loss_first, c->eval_loss_first, k_loss_tol * c->eval_loss_first);
        EXPECT_NEAR(g->train_loss, c->train_loss, 1e-4 * c->train_loss);
        EXPECT_NEAR(g->eval_loss, c->eval_loss, 1e-4 * c->eval_loss);
        EXPECT_LT(g->eval_loss, g->eval_loss_first);  // it trains
        // The adapters after 3 Adam steps: each element within 1e-2 lr of the CPU's (Adam's
        // normalised steps carry the gradients' relative error; elements with tiny gradients may
        // move differently: test_finetune's 5e-2 lr bound for those).
        auto m = llama_model::open(model);
        ASSERT_TRUE(m);
        lora_adapter ac    = read_adapter(p.out_dir, (*m)->hparams());
        lora_adapter ag    = read_adapter(d.file("gpu-" + std::to_string(mi)), (*m)->hparams());
        double       worst = 0;
        for (size_t l = 0; l < ag.layers.size(); ++l)
            for (size_t r = 0; r < ag.layers[l].size(); ++r)
                for (auto [x, y] : {std::pair{&ag.layers[l][r].a, &ac.layers[l][r].a},
                                    std::pair{&ag.layers[l][r].b, &ac.layers[l][r].b}})
                    for (size_t i = 0; i < x->size(); ++i)
                        worst = std::max(worst, std::fabs(double((*x)[i]) - (*y)[i]) / p.lr);
        std::printf("  adapter: worst |gpu - cpu| %.3g lr\n", worst);
        EXPECT_LT(worst, 5e-2);
    }
}
