// quant on hostile numbers (docs/reliability.md): NaN/Inf in weights or in the Hessian are errors
// that say where; an all-zero Hessian (no calibration signal) falls back to round-to-nearest; a
// singular (rank-deficient) Hessian is absorbed by damping; NaN never reaches an integer code.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "quant/gptq.h"

using namespace gptq;

namespace {

std::vector<float> random_weight(int64_t n_out, int64_t n_in, uint32_t seed) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd(0.0f, 0.05f);
    std::vector<float>              w(static_cast<size_t>(n_out * n_in));
    for (auto& v : w) v = nd(rng);
    return w;
}

// H = (2/n) X^T X for n_tokens rows of X that are all multiples of one random row: rank 1.
std::vector<float> rank1_hessian(int64_t n_in, uint32_t seed, int64_t n_tokens = 16) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd;
    std::vector<float>              row(static_cast<size_t>(n_in)), x(static_cast<size_t>(n_tokens * n_in));
    for (auto& v : row) v = nd(rng);
    for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t k = 0; k < n_in; ++k)
            x[static_cast<size_t>(t * n_in + k)] = static_cast<float>(t + 1) * row[static_cast<size_t>(k)];
    hessian_accumulator acc(n_in);
    acc.add(ops_context{}, x.data(), n_tokens);
    return acc.finish();
}

void expect_finite_result(const quantized_linear& q) {
    std::vector<float> w(static_cast<size_t>(q.n_out * q.n_in));
    quantized_linear_dequantize(q, w.data());
    for (float v : w) ASSERT_TRUE(std::isfinite(v));
    for (float s : q.scales) ASSERT_TRUE(std::isfinite(s) && s > 0.0f);
}

gptq_options opts(int group_size) {
    gptq_options o;
    o.bits       = 4;
    o.group_size = group_size;
    return o;
}

}  // namespace

TEST(quant_hostile, grid_quantize_maps_nan_to_a_defined_code) {
    const grid_params p{0.1f, 8};
    EXPECT_EQ(grid_quantize(std::numeric_limits<float>::quiet_NaN(), p, 15), 0);
    EXPECT_EQ(grid_quantize(std::numeric_limits<float>::infinity(), p, 15), 15);
    EXPECT_EQ(grid_quantize(-std::numeric_limits<float>::infinity(), p, 15), 0);
}

TEST(quant_hostile, nan_or_inf_in_the_weight_is_an_error_that_says_where) {
    const int64_t n_out = 8, n_in = 64;
    const auto    h = rank1_hessian(n_in, 1);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        auto w           = random_weight(n_out, n_in, 2);
        w[3 * n_in + 17] = bad;
        w[5 * n_in + 2]  = bad;
        auto r           = rtn_quantize(ops_context{}, w.data(), n_out, n_in, opts(32));
        ASSERT_FALSE(r.is_ok());
        EXPECT_NE(r.error().message().find("[3, 17]"), std::string::npos) << r.error().message();
        EXPECT_NE(r.error().message().find("2 non-finite values"), std::string::npos) << r.error().message();
        auto g = gptq_quantize(ops_context{}, w.data(), n_out, n_in, h.data(), opts(32));
        ASSERT_FALSE(g.is_ok());
        EXPECT_NE(g.error().message().find("weight"), std::string::npos) << g.error().message();
    }
}

TEST(quant_hostile, non_finite_hessian_names_the_calibration_inputs) {
    const int64_t n_out = 8, n_in = 32;
    const auto    w = random_weight(n_out, n_in, 3);
    auto          h = rank1_hessian(n_in, 4);
    h[5 * n_in + 9] = std::numeric_limits<float>::infinity();
    auto g          = gptq_quantize(ops_context{}, w.data(), n_out, n_in, h.data(), opts(-1));
    ASSERT_FALSE(g.is_ok());
    EXPECT_NE(g.error().message().find("Hessian"), std::string::npos) << g.error().message();
    EXPECT_NE(g.error().message().find("[5, 9]"), std::string::npos) << g.error().message();
}

TEST(quant_hostile, all_zero_hessian_falls_back_to_round_to_nearest) {
    for (bool desc_act : {false, true})
        for (int gs : {-1, 16}) {
            SCOPED_TRACE(testing::Message() << "desc_act " << desc_act << " group " << gs);
            const int64_t      n_out = 16, n_in = 64;
            const auto         w = random_weight(n_out, n_in, 5);
            std::vector<float> h(static_cast<size_t>(n_in * n_in), 0.0f);
            gptq_options       o = opts(gs);
            o.desc_act           = desc_act;
            gptq_stats st;
            auto       g = gptq_quantize(ops_context{}, w.data(), n_out, n_in, h.data(), o, &st);
            ASSERT_TRUE(g.is_ok()) << g.error().message();
            auto r = rtn_quantize(ops_context{}, w.data(), n_out, n_in, o);
            ASSERT_TRUE(r.is_ok());
            EXPECT_EQ(st.n_dead_columns, n_in);
            EXPECT_EQ(g->codes, r->codes);
            EXPECT_EQ(g->scales, r->scales);
            EXPECT_EQ(g->zeros, r->zeros);
            EXPECT_EQ(g->g_idx, r->g_idx);
            // Not the dead-column rule's all-zero weight.
            std::vector<float> dq(w.size());
            quantized_linear_dequantize(*g, dq.data());
            double norm = 0;
            for (float v : dq) norm += std::fabs(v);
            EXPECT_GT(norm, 0.0);
        }
}

TEST(quant_hostile, singular_hessians_are_damped_and_give_finite_results) {
    const int64_t n_out = 16, n_in = 64;
    const auto    w = random_weight(n_out, n_in, 6);
    // Rank 1 (one repeated calibration token), and rank 1 with half of the columns dead.
    auto h1 = rank1_hessian(n_in, 7);
    auto h2 = h1;
    for (int64_t k = 0; k < n_in; k += 2)
        for (int64_t j = 0; j < n_in; ++j)
            h2[static_cast<size_t>(k * n_in + j)] = h2[static_cast<size_t>(j * n_in + k)] = 0.0f;
    for (const auto* h : {&h1, &h2})
        for (bool desc_act : {false, true}) {
            gptq_options o = opts(16);
            o.desc_act     = desc_act;
            gptq_stats st;
            auto       g = gptq_quantize(ops_context{}, w.data(), n_out, n_in, h->data(), o, &st);
            ASSERT_TRUE(g.is_ok()) << g.error().message();
            expect_finite_result(*g);
            EXPECT_TRUE(std::isfinite(st.loss));
            std::vector<float> dq(w.size());
            quantized_linear_dequantize(*g, dq.data());
            EXPECT_TRUE(
                std::isfinite(hessian_weighted_error(ops_context{}, w.data(), dq.data(), n_out, n_in, h->data())));
        }
}

TEST(quant_hostile, huge_finite_weights_keep_scales_in_f16_range) {
    const int64_t n_out = 4, n_in = 32;
    auto          w = random_weight(n_out, n_in, 8);
    w[1 * n_in + 3] = 1e30f;  // beyond F16: the scale saturates at F16's largest finite value
    auto r          = rtn_quantize(ops_context{}, w.data(), n_out, n_in, opts(16));
    ASSERT_TRUE(r.is_ok());
    expect_finite_result(*r);
    auto h = rank1_hessian(n_in, 9);
    auto g = gptq_quantize(ops_context{}, w.data(), n_out, n_in, h.data(), opts(16));
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    expect_finite_result(*g);
}
