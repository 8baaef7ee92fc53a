// quant: the quantization grid, RTN, and GPTQ on synthetic layers with correlated inputs:
// GPTQ beats RTN on the error it minimises, the blocked loop equals the unblocked one,
// act-order / static-group g_idx semantics, dead columns and non-positive-definite Hessians.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "quant/gptq.h"

using namespace gptq;

namespace {

struct layer {
    int64_t            n_out, n_in;
    std::vector<float> w;  // [n_out, n_in]
    std::vector<float> h;  // [n_in, n_in]
};

// Inputs with strongly correlated features and uneven scales, as real activations have:
// x = z A + outlier columns, z ~ N(0, 1) of rank n_in / 2.
layer make_layer(int64_t n_out, int64_t n_in, uint32_t seed, int64_t n_tokens = 512) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd;
    layer                           L{n_out, n_in, {}, {}};
    L.w.resize(static_cast<size_t>(n_out * n_in));
    for (auto& v : L.w) v = 0.05f * nd(rng);
    const int64_t      r = std::max<int64_t>(1, n_in / 2);
    std::vector<float> a(static_cast<size_t>(r * n_in));
    for (auto& v : a) v = nd(rng);
    std::vector<float> x(static_cast<size_t>(n_tokens * n_in), 0.0f);
    for (int64_t t = 0; t < n_tokens; ++t) {
        std::vector<float> z(static_cast<size_t>(r));
        for (auto& v : z) v = nd(rng);
        for (int64_t j = 0; j < r; ++j)
            for (int64_t k = 0; k < n_in; ++k)
                x[static_cast<size_t>(t * n_in + k)] +=
                    z[static_cast<size_t>(j)] * a[static_cast<size_t>(j * n_in + k)];
        for (int64_t k = 0; k < n_in; k += 7) x[static_cast<size_t>(t * n_in + k)] *= 4.0f;  // outlier features
        for (int64_t k = 0; k < n_in; ++k) x[static_cast<size_t>(t * n_in + k)] += 0.1f * nd(rng);
    }
    hessian_accumulator acc(n_in);
    ops_context         ctx;
    acc.add(ctx, x.data(), n_tokens / 2);
    acc.add(ctx, x.data() + (n_tokens / 2) * n_in, n_tokens - n_tokens / 2);
    L.h = acc.finish();
    return L;
}

std::vector<float> dequant(const quantized_linear& q) {
    std::vector<float> out(static_cast<size_t>(q.n_out * q.n_in));
    quantized_linear_dequantize(q, out.data());
    return out;
}

double herr(const layer& L, const quantized_linear& q) {
    return hessian_weighted_error(ops_context{}, L.w.data(), dequant(q).data(), L.n_out, L.n_in, L.h.data());
}

}  // namespace

TEST(grid, params_follow_the_reference_rules) {
    grid_options sym{4, true, false, 0}, asym{4, false, false, 0};
    const float  x[] = {-1.5f, 0.25f, 3.0f};
    auto         ps  = grid_find_params(x, 3, 1, sym);
    EXPECT_EQ(ps.zero, 8);
    EXPECT_EQ(ps.scale, f16_to_f32(f32_to_f16(6.0f / 15.0f)));  // range [-3, 3]
    auto pa = grid_find_params(x, 3, 1, asym);
    EXPECT_EQ(pa.scale, f16_to_f32(f32_to_f16(4.5f / 15.0f)));
    EXPECT_EQ(pa.zero, static_cast<int>(std::nearbyint(1.5f / pa.scale)));
    // All positive: the range still includes 0 (xmin = 0), asym zero = 0.
    const float pos[] = {1.0f, 2.0f};
    EXPECT_EQ(grid_find_params(pos, 2, 1, asym).zero, 0);
    // All zero: [-1, 1].
    const float zero[] = {0.0f, 0.0f};
    EXPECT_EQ(grid_find_params(zero, 2, 1, asym).scale, f16_to_f32(f32_to_f16(2.0f / 15.0f)));
    // Stride: every other element.
    const float strided[] = {1.0f, 100.0f, -1.0f, 100.0f};
    EXPECT_EQ(grid_find_params(strided, 2, 2, sym).scale, f16_to_f32(f32_to_f16(2.0f / 15.0f)));
    // zero_min keeps asym zeros representable in the v1 format.
    EXPECT_EQ(grid_find_params(pos, 2, 1, grid_options{4, false, false, 1}).zero, 1);
    // Rounding is half to even.
    grid_params p{1.0f, 0};
    EXPECT_EQ(grid_quantize(2.5f, p, 15), 2);
    EXPECT_EQ(grid_quantize(3.5f, p, 15), 4);
    EXPECT_EQ(grid_quantize(-0.5f, p, 15), 0);
    EXPECT_EQ(grid_quantize(99.0f, p, 15), 15);
}

TEST(grid, mse_search_never_increases_the_error) {
    std::mt19937                       rng(3);
    std::student_t_distribution<float> heavy(3.0f);
    for (int bits : {2, 3, 4}) {
        std::vector<float> x(256);
        for (auto& v : x) v = heavy(rng);
        for (bool sym : {true, false}) {
            const int maxq = grid_maxq(bits);
            auto      err  = [&](grid_params p) {
                double e = 0;
                for (float v : x) e += std::pow(std::fabs(grid_dequantize(grid_quantize(v, p, maxq), p) - v), 2.4);
                return e;
            };
            const auto plain = grid_find_params(x.data(), 256, 1, {bits, sym, false, 0});
            const auto mse   = grid_find_params(x.data(), 256, 1, {bits, sym, true, 0});
            EXPECT_LE(err(mse), err(plain)) << bits << sym;
            if (bits <= 3) {
                EXPECT_LT(err(mse), 0.95 * err(plain)) << "heavy tails: clipping must pay at " << bits;
            }
        }
    }
}

// --mse-hessian's range: never a larger diag(H)-weighted squared error than the full range.
TEST(grid, weighted_search_never_increases_the_weighted_error) {
    std::mt19937                          rng(4);
    std::student_t_distribution<float>    heavy(3.0f);
    std::uniform_real_distribution<float> u(0.0f, 2.0f);
    for (int bits : {2, 3, 4}) {
        std::vector<float> x(128), wt(128);
        for (auto& v : x) v = heavy(rng);
        for (auto& v : wt) v = u(rng);
        for (bool sym : {true, false}) {
            const int maxq = grid_maxq(bits);
            auto      err  = [&](grid_params p) {
                double e = 0;
                for (size_t i = 0; i < x.size(); ++i) {
                    const double d = grid_dequantize(grid_quantize(x[i], p, maxq), p) - x[i];
                    e += wt[i] * d * d;
                }
                return e;
            };
            const auto plain = grid_find_params(x.data(), 128, 1, {bits, sym, false, 0});
            const auto w     = grid_find_params_weighted(x.data(), wt.data(), 128, {bits, sym, false, 0});
            EXPECT_LE(err(w), err(plain)) << bits << sym;
        }
    }
}

TEST(gptq, beats_rtn_on_correlated_inputs) {
    thread_pool pool(2);
    ops_context ctx{&pool, false};
    const auto  L = make_layer(96, 256, 1);
    for (int bits : {2, 3, 4, 8})
        for (int gs : {-1, 32, 128})
            for (bool sym : {true, false}) {
                gptq_options o;
                o.bits       = bits;
                o.group_size = gs;
                o.sym        = sym;
                auto g       = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), o);
                auto r       = rtn_quantize(ctx, L.w.data(), L.n_out, L.n_in, o);
                ASSERT_TRUE(g.is_ok()) << g.error().message();
                ASSERT_TRUE(r.is_ok());
                const double eg = herr(L, *g), er = herr(L, *r);
                EXPECT_LT(eg, 0.7 * er) << "bits " << bits << " gs " << gs << " sym " << sym << ": gptq " << eg
                                        << " rtn " << er;
                for (uint8_t c : g->codes) ASSERT_LE(c, (1 << bits) - 1);
            }
}

TEST(gptq, act_order_and_static_groups) {
    ops_context  ctx;
    const auto   L = make_layer(64, 128, 2);
    gptq_options o;
    o.group_size = 32;
    o.desc_act   = true;
    auto g       = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), o);
    ASSERT_TRUE(g.is_ok());
    ASSERT_EQ(g->perm.size(), 128u);
    // perm sorts diag(H) descending; group i/gs holds the i-th block of 32 processed columns.
    for (size_t i = 1; i < 128; ++i)
        EXPECT_GE(L.h[static_cast<size_t>(g->perm[i - 1]) * 129], L.h[static_cast<size_t>(g->perm[i]) * 129]);
    std::map<int, int> count;
    for (size_t i = 0; i < 128; ++i) {
        EXPECT_EQ(g->g_idx[static_cast<size_t>(g->perm[i])], static_cast<int32_t>(i / 32));
        count[g->g_idx[i]]++;
    }
    for (auto [grp, n] : count) EXPECT_EQ(n, 32) << grp;
    bool trivial = true;
    for (size_t k = 0; k < 128; ++k) trivial &= g->g_idx[k] == static_cast<int32_t>(k / 32);
    EXPECT_FALSE(trivial) << "act-order g_idx should not be contiguous on this layer";

    o.static_groups = true;
    auto s          = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), o);
    ASSERT_TRUE(s.is_ok());
    for (size_t k = 0; k < 128; ++k) EXPECT_EQ(s->g_idx[k], static_cast<int32_t>(k / 32));
    auto r = rtn_quantize(ctx, L.w.data(), L.n_out, L.n_in, o);
    // Static groups take their params from the original weights, as RTN does.
    EXPECT_EQ(s->scales, r->scales);
    EXPECT_LT(herr(L, *s), 0.8 * herr(L, *r));
    EXPECT_LT(herr(L, *g), 0.8 * herr(L, *r));
}

// GAR: processing order = each group's columns by descending diag(H), groups by their largest
// diag; g_idx stays contiguous (k / gs) and each group's scales are those computed when its block
// was processed; with one group it is act-order exactly; with desc_act it is refused.
TEST(gptq, gar_keeps_contiguous_groups) {
    ops_context  ctx;
    const auto   L = make_layer(64, 128, 5);
    gptq_options o;
    o.group_size = 32;
    o.gar        = true;
    auto g       = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), o);
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    ASSERT_EQ(g->perm.size(), 128u);
    auto d = [&](int32_t k) { return L.h[static_cast<size_t>(k) * 129]; };
    for (size_t i = 0; i < 128; ++i) {
        EXPECT_EQ(g->g_idx[i], static_cast<int32_t>(i / 32));
        EXPECT_EQ(g->perm[i] / 32, g->perm[(i / 32) * 32] / 32) << "block " << i / 32 << " is one group";
        if (i % 32) {
            EXPECT_GE(d(g->perm[i - 1]), d(g->perm[i]));
        }
    }
    for (size_t b = 1; b < 4; ++b) EXPECT_GE(d(g->perm[(b - 1) * 32]), d(g->perm[b * 32]));
    bool natural = true;
    for (size_t i = 0; i < 128; ++i) natural &= g->perm[i] == static_cast<int32_t>(i);
    EXPECT_FALSE(natural);
    auto plain = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), gptq_options{.group_size = 32});
    auto r     = rtn_quantize(ctx, L.w.data(), L.n_out, L.n_in, o);
    ASSERT_TRUE(plain.is_ok() && r.is_ok());
    EXPECT_LT(herr(L, *g), 0.8 * herr(L, *r));
    RecordProperty("gar_over_plain", std::to_string(herr(L, *g) / herr(L, *plain)));

    // One group: GAR is act-order.
    o.group_size    = -1;
    gptq_options da = o;
    da.gar          = false;
    da.desc_act     = true;
    auto g1         = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), o);
    auto a1         = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), da);
    ASSERT_TRUE(g1.is_ok() && a1.is_ok());
    EXPECT_EQ(g1->codes, a1->codes);
    EXPECT_EQ(g1->scales, a1->scales);
    EXPECT_EQ(g1->g_idx, a1->g_idx);
    da.gar    = true;
    auto both = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), da);
    ASSERT_FALSE(both.is_ok());
    EXPECT_NE(both.error().message().find("exclude each other"), std::string::npos);
}

TEST(gptq, blocked_loop_equals_unblocked) {
    thread_pool pool(2);
    ops_context ctx{&pool, false};
    const auto  L = make_layer(48, 200, 3);
    for (bool desc : {false, true})
        for (int gs : {-1, 64}) {
            gptq_options a;
            a.group_size   = gs;
            a.desc_act     = desc;
            a.block_size   = 1;  // no lazy updates: the textbook algorithm
            gptq_options b = a;
            b.block_size   = 128;
            gptq_options c = a;
            c.block_size   = gs == -1 ? 7 : 32;  // group params are exact when groups do not straddle blocks
            auto qa        = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), a);
            auto qb        = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), b);
            auto qc        = gptq_quantize(ctx, L.w.data(), L.n_out, L.n_in, L.h.data(), c);
            ASSERT_TRUE(qa.is_ok() && qb.is_ok() && qc.is_ok());
            // Same math, different float summation order: codes may differ only where a value sits
            // on a rounding boundary. Demand near-identity.
            for (auto* q : {&*qb, &*qc}) {
                size_t same = 0;
                for (size_t i = 0; i < qa->codes.size(); ++i) same += qa->codes[i] == q->codes[i];
                EXPECT_GT(static_cast<double>(same) / static_cast<double>(qa->codes.size()), 0.998) << desc << gs;
                EXPECT_NEAR(herr(L, *q), herr(L, *qa), 0.02 * herr(L, *qa));
            }
        }
}

TEST(gptq, identity_hessian_reduces_to_rtn) {
    ops_context        ctx;
    const auto         L = make_layer(32, 64, 4);
    std::vector<float> eye(64 * 64, 0.0f);
    for (int i = 0; i < 64; ++i) eye[static_cast<size_t>(i * 65)] = 1.0f;
    for (int gs : {-1, 16}) {
        gptq_options o;
        o.group_size = gs;
        o.bits       = 3;
        auto g       = gptq_quantize(ctx, L.w.data(), 32, 64, eye.data(), o);
        auto r       = rtn_quantize(ctx, L.w.data(), 32, 64, o);
        ASSERT_TRUE(g.is_ok() && r.is_ok());
        EXPECT_EQ(g->codes, r->codes);
        EXPECT_EQ(g->scales, r->scales);
        EXPECT_EQ(g->zeros, r->zeros);
    }
}

TEST(gptq, dead_columns_and_rank_deficient_hessians) {
    ops_context ctx;
    // Few tokens: H has rank 8 < 64 (singular); damping makes it positive definite.
    auto L = make_layer(32, 64, 5, 8);
    for (int k = 0; k < 64; k += 9) {  // columns whose input is always zero
        for (int j = 0; j < 64; ++j) L.h[static_cast<size_t>(k * 64 + j)] = L.h[static_cast<size_t>(j * 64 + k)] = 0.0f;
    }
    gptq_stats   st;
    gptq_options o;
    o.group_size = 32;
    auto g       = gptq_quantize(ctx, L.w.data(), 32, 64, L.h.data(), o, &st);
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    EXPECT_EQ(st.n_dead_columns, 8);
    const auto dq = dequant(*g);
    for (int r = 0; r < 32; ++r)
        for (int k = 0; k < 64; k += 9) EXPECT_EQ(dq[static_cast<size_t>(r * 64 + k)], 0.0f) << "dead column -> 0";
}

TEST(gptq, indefinite_hessian_raises_damping_then_fails_clearly) {
    ops_context        ctx;
    const auto         L = make_layer(16, 32, 6);
    std::vector<float> h(32 * 32, 0.0f);
    for (int i = 0; i < 32; ++i) h[static_cast<size_t>(i * 33)] = 1.0f;
    h[0] = -0.02f;  // one negative eigenvalue: fails at damp 0.01, passes once damp > ~0.03
    gptq_stats   st;
    gptq_options o;
    o.group_size = -1;
    auto g       = gptq_quantize(ctx, L.w.data(), 16, 32, h.data(), o, &st);
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    EXPECT_GT(st.damp_percent_used, 0.02);
    EXPECT_LT(st.damp_percent_used, 0.06);

    for (auto& v : h) v = -v;  // negative definite: no damping below 1 helps
    auto bad = gptq_quantize(ctx, L.w.data(), 16, 32, h.data(), o, &st);
    ASSERT_FALSE(bad.is_ok());
    EXPECT_NE(bad.error().message().find("not positive definite"), std::string::npos) << bad.error().message();

    o.bits   = 5;
    auto opt = gptq_quantize(ctx, L.w.data(), 16, 32, L.h.data(), o);
    ASSERT_FALSE(opt.is_ok());
    EXPECT_NE(opt.error().message().find("bits 5"), std::string::npos);
}

// The threaded dequantization equals the single-threaded one bit for bit (rows are independent),
// on fresh random codes, act-order g_idx and awkward row counts.
TEST(quant, threaded_dequantize_equals_plain) {
    std::random_device rd;
    const uint32_t     seed = rd();
    std::mt19937       rng(seed);
    thread_pool        pool(3);
    for (int64_t n_out : {int64_t(1), int64_t(63), int64_t(64), int64_t(1000)}) {
        quantized_linear q;
        q.n_out      = n_out;
        q.n_in       = 96;
        q.bits       = 4;
        q.group_size = 32;
        q.n_groups   = 3;
        q.codes.resize(size_t(q.n_out * q.n_in));
        for (auto& c : q.codes) c = uint8_t(rng() % 16);
        q.scales.resize(size_t(q.n_groups * q.n_out));
        for (auto& s : q.scales) s = float(rng() % 1000) / 997.0f;
        q.zeros.resize(q.scales.size());
        for (auto& z : q.zeros) z = int32_t(rng() % 16);
        q.g_idx.resize(size_t(q.n_in));
        for (auto& g : q.g_idx) g = int32_t(rng() % 3);  // act-order: groups in any column order
        std::vector<float> a(q.codes.size()), b(q.codes.size(), -1.0f);
        quantized_linear_dequantize(q, a.data());
        quantized_linear_dequantize(ops_context{&pool, false}, q, b.data());
        EXPECT_EQ(a, b) << "n_out " << n_out << " seed " << seed;
    }
}

// rtn_quantize_weighted (the quantized embedding table): each (row, group) takes the grid of
// grid_find_params_weighted over that group's weights, a shorter last group included; the same
// codes with and without a pool; bad weights and the |q - w|^2.4 grid are refused.
TEST(quant, rtn_weighted_groups_follow_the_weighted_grid) {
    std::mt19937                          rng(9);
    std::student_t_distribution<float>    heavy(3.0f);
    std::uniform_real_distribution<float> u(0.0f, 5.0f);
    const int64_t                         n_out = 6, n_in = 72;  // groups of 32: 32, 32, 8
    std::vector<float>                    w(static_cast<size_t>(n_out * n_in)), wt(static_cast<size_t>(n_in));
    for (auto& v : w) v = heavy(rng);
    for (auto& v : wt) v = u(rng);
    for (int bits : {3, 4, 8}) {
        gptq_options o;
        o.bits       = bits;
        o.group_size = 32;
        auto q       = rtn_quantize_weighted(ops_context{}, w.data(), n_out, n_in, wt.data(), o);
        ASSERT_TRUE(q.is_ok()) << q.error().message();
        ASSERT_EQ(q->n_groups, 3);
        thread_pool pool(3);
        auto        qp = rtn_quantize_weighted(ops_context{&pool, false}, w.data(), n_out, n_in, wt.data(), o);
        ASSERT_TRUE(qp.is_ok());
        EXPECT_EQ(qp->codes, q->codes);
        EXPECT_EQ(qp->scales, q->scales);
        for (int64_t r = 0; r < n_out; ++r)
            for (int64_t g = 0; g < 3; ++g) {
                const int64_t k0 = g * 32, n = std::min<int64_t>(32, n_in - k0);
                const auto    p =
                    grid_find_params_weighted(&w[size_t(r * n_in + k0)], &wt[size_t(k0)], n, {bits, true, false, 0});
                EXPECT_EQ(q->scales[size_t(g * n_out + r)], p.scale) << bits << " " << r << " " << g;
                EXPECT_EQ(q->zeros[size_t(g * n_out + r)], p.zero);
                for (int64_t k = k0; k < k0 + n; ++k) {
                    EXPECT_EQ(q->codes[size_t(r * n_in + k)],
                              grid_quantize(w[size_t(r * n_in + k)], p, grid_maxq(bits)));
                    EXPECT_EQ(q->g_idx[size_t(k)], g);
                }
            }
    }
    gptq_options       o;
    std::vector<float> bad = wt;
    bad[5]                 = -1.0f;
    EXPECT_FALSE(rtn_quantize_weighted(ops_context{}, w.data(), n_out, n_in, bad.data(), o).is_ok());
    bad[5] = NAN;
    EXPECT_FALSE(rtn_quantize_weighted(ops_context{}, w.data(), n_out, n_in, bad.data(), o).is_ok());
    o.mse = true;
    EXPECT_FALSE(rtn_quantize_weighted(ops_context{}, w.data(), n_out, n_in, wt.data(), o).is_ok());
}

// ---- GPTAQ (quant/gptq.h gptaq_quantize; format.md section 2.6) ----
namespace {

// Calibration inputs of a linear in the full-precision model (fp) and in a partly quantized one
// (q = fp A, A = I + mix * G: the earlier layers' error as a fixed linear distortion, plus noise),
// [n_tokens, n_in] each; the same correlated generator as make_layer.
struct two_streams {
    int64_t            n_tokens, n_in;
    std::vector<float> fp, q;
};

two_streams make_streams(int64_t n_in, uint32_t seed, float mix, int64_t n_tokens = 512) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd;
    two_streams                     s{n_tokens, n_in, std::vector<float>(size_t(n_tokens * n_in), 0.0f), {}};
    const int64_t                   r = n_in / 2;
    std::vector<float>              a(size_t(r * n_in)), g(size_t(n_in * n_in));
    for (auto& v : a) v = nd(rng);
    for (auto& v : g) v = nd(rng) / std::sqrt(float(n_in));
    for (int64_t t = 0; t < n_tokens; ++t) {
        float* x = &s.fp[size_t(t * n_in)];
        for (int64_t j = 0; j < r; ++j) {
            const float z = nd(rng);
            for (int64_t k = 0; k < n_in; ++k) x[k] += z * a[size_t(j * n_in + k)];
        }
        for (int64_t k = 0; k < n_in; k += 7) x[k] *= 4.0f;
        for (int64_t k = 0; k < n_in; ++k) x[k] += 0.1f * nd(rng);
    }
    s.q = s.fp;
    for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t k = 0; k < n_in; ++k) {
            double v = 0;
            for (int64_t j = 0; j < n_in; ++j) v += double(s.fp[size_t(t * n_in + j)]) * g[size_t(j * n_in + k)];
            s.q[size_t(t * n_in + k)] += mix * float(v) + 0.02f * nd(rng);
        }
    return s;
}

// sum_t |W~ x_q,t - W x_fp,t|^2 / n_tokens: the output error GPTAQ aims at.
double output_error(const two_streams& s, const std::vector<float>& w, const std::vector<float>& wq, int64_t n_out) {
    double e = 0;
    for (int64_t t = 0; t < s.n_tokens; ++t)
        for (int64_t r = 0; r < n_out; ++r) {
            double a = 0;
            for (int64_t k = 0; k < s.n_in; ++k)
                a += double(wq[size_t(r * s.n_in + k)]) * s.q[size_t(t * s.n_in + k)] -
                     double(w[size_t(r * s.n_in + k)]) * s.fp[size_t(t * s.n_in + k)];
            e += a * a;
        }
    return e / double(s.n_tokens);
}

// The GPTAQ update written straight from its formula, in double, natural column order, no lazy
// blocks: U = upper Cholesky factor of (H + damp I)^-1, P = alpha triu_1(D U^T) U, and for each
// column i: grid of its group from the current row values at the group's start, q_i, then
// W[:, j] -= (w_i - q_i) / U[i, i] U[i, j] - w_i P[i, j] for j > i.
std::vector<uint8_t> gptaq_plain(std::vector<float> w, int64_t n_out, int64_t n, const std::vector<float>& h,
                                 const std::vector<float>& d, const gptq_options& o) {
    const auto          N = size_t(n);
    std::vector<double> a(N * N);
    double              mean = 0;
    for (size_t i = 0; i < N; ++i) mean += h[i * N + i] / double(n);
    for (size_t i = 0; i < N * N; ++i) a[i] = h[i];
    for (size_t i = 0; i < N; ++i) a[i * N + i] += o.damp_percent * mean;
    // inverse by Gauss-Jordan
    std::vector<double> inv(N * N, 0.0);
    for (size_t i = 0; i < N; ++i) inv[i * N + i] = 1.0;
    for (size_t c = 0; c < N; ++c) {
        const double p = a[c * N + c];
        for (size_t j = 0; j < N; ++j) a[c * N + j] /= p, inv[c * N + j] /= p;
        for (size_t r = 0; r < N; ++r)
            if (r != c) {
                const double f = a[r * N + c];
                for (size_t j = 0; j < N; ++j) a[r * N + j] -= f * a[c * N + j], inv[r * N + j] -= f * inv[c * N + j];
            }
    }
    // inv = U^T U, U upper: U[i][i] = sqrt(inv[i][i] - sum_{k<i} U[k][i]^2), U[i][j] = (inv[i][j] - sum_k U[k][i]
    // U[k][j]) / U[i][i]
    std::vector<double> U(N * N, 0.0);
    for (size_t i = 0; i < N; ++i) {
        double s = inv[i * N + i];
        for (size_t k = 0; k < i; ++k) s -= U[k * N + i] * U[k * N + i];
        U[i * N + i] = std::sqrt(s);
        for (size_t j = i + 1; j < N; ++j) {
            double t = inv[i * N + j];
            for (size_t k = 0; k < i; ++k) t -= U[k * N + i] * U[k * N + j];
            U[i * N + j] = t / U[i * N + i];
        }
    }
    std::vector<double> T(N * N, 0.0), P(N * N, 0.0);
    for (size_t i = 0; i < N; ++i)
        for (size_t k = i + 1; k < N; ++k)
            for (size_t j = 0; j < N; ++j) T[i * N + k] += double(d[i * N + j]) * U[k * N + j];
    for (size_t i = 0; i < N; ++i)
        for (size_t j = 0; j < N; ++j)
            for (size_t k = 0; k < N; ++k) P[i * N + j] += o.gptaq_alpha * T[i * N + k] * U[k * N + j];
    const int64_t        gs = o.group_size == -1 ? n : o.group_size;
    const grid_options   g{o.bits, o.sym, o.mse, o.zero_min};
    const int            maxq = grid_maxq(o.bits);
    std::vector<uint8_t> codes(size_t(n_out) * N);
    for (int64_t r = 0; r < n_out; ++r) {
        std::vector<double> x(w.begin() + r * n, w.begin() + (r + 1) * n);
        grid_params         p{};
        for (size_t i = 0; i < N; ++i) {
            if (int64_t(i) % gs == 0) {
                std::vector<float> grp;
                for (size_t k = i; k < std::min(N, i + size_t(gs)); ++k) grp.push_back(float(x[k]));
                p = grid_find_params(grp.data(), int64_t(grp.size()), 1, g);
            }
            const double wi          = x[i];
            const int    qi          = grid_quantize(float(wi), p, maxq);
            codes[size_t(r) * N + i] = uint8_t(qi);
            const double e           = (wi - grid_dequantize(qi, p)) / U[i * N + i];
            for (size_t j = i + 1; j < N; ++j) x[j] -= e * U[i * N + j] - wi * P[i * N + j];
        }
    }
    return codes;
}

struct gptaq_case {
    two_streams        s;
    std::vector<float> w, h, d;
    int64_t            n_out;
};

gptaq_case make_gptaq_case(int64_t n_out, int64_t n_in, uint32_t seed, float mix) {
    gptaq_case                      c{make_streams(n_in, seed, mix), {}, {}, {}, n_out};
    std::mt19937                    rng(seed + 1000);
    std::normal_distribution<float> nd;
    c.w.resize(size_t(n_out * n_in));
    for (auto& v : c.w) v = 0.05f * nd(rng);
    ops_context         ctx;
    hessian_accumulator ha(n_in);
    cross_accumulator   ca(n_in);
    const int64_t       half = c.s.n_tokens / 2;  // two batches, as the calibration passes feed them
    ha.add(ctx, c.s.q.data(), half);
    ca.add(ctx, c.s.fp.data(), c.s.q.data(), half);
    ha.add(ctx, c.s.q.data() + half * n_in, c.s.n_tokens - half);
    ca.add(ctx, c.s.fp.data() + half * n_in, c.s.q.data() + half * n_in, c.s.n_tokens - half);
    c.h = ha.finish();
    c.d = ca.finish();
    return c;
}

}  // namespace

TEST(gptaq, cross_term_is_the_formula) {
    const auto    c = make_gptaq_case(4, 24, 11, 0.3f);
    const int64_t n = 24;
    for (int64_t i = 0; i < n; i += 5)
        for (int64_t j = 0; j < n; j += 3) {
            double s = 0;
            for (int64_t t = 0; t < c.s.n_tokens; ++t)
                s += (double(c.s.fp[size_t(t * n + i)]) - c.s.q[size_t(t * n + i)]) * c.s.q[size_t(t * n + j)];
            s *= 2.0 / double(c.s.n_tokens);
            EXPECT_NEAR(c.d[size_t(i * n + j)], s, 1e-4 * (1.0 + std::fabs(s))) << i << "," << j;
        }
}

// The blocked, threaded solve against the column-by-column formula (gptaq_plain): codes equal but
// where a value sits on a rounding boundary (float vs double), for several block sizes, groups
// that straddle blocks or not, sym and asym, alpha 0.25 and 1.
TEST(gptaq, blocked_solve_equals_the_plain_formula) {
    thread_pool pool(2);
    ops_context ctx{&pool, false};
    const auto  c = make_gptaq_case(40, 160, 12, 0.3f);
    for (double alpha : {0.25, 1.0})
        for (int gs : {-1, 32})
            for (bool sym : {true, false})
                for (int block : {1, 48, 128}) {
                    gptq_options o;
                    o.bits        = 3;
                    o.group_size  = gs;
                    o.sym         = sym;
                    o.block_size  = block;
                    o.gptaq       = true;
                    o.gptaq_alpha = alpha;
                    if (gs != -1 && block != 1 && block % gs != 0)
                        continue;  // group params exact: no group straddles a block
                    auto q = gptaq_quantize(ctx, c.w.data(), c.n_out, 160, c.h.data(), c.d.data(), o);
                    ASSERT_TRUE(q.is_ok()) << q.error().message();
                    const auto ref  = gptaq_plain(c.w, c.n_out, 160, c.h, c.d, o);
                    size_t     same = 0;
                    for (size_t i = 0; i < ref.size(); ++i) same += ref[i] == q->codes[i];
                    EXPECT_GT(double(same) / double(ref.size()), 0.995)
                        << "alpha " << alpha << " gs " << gs << " sym " << sym << " block " << block;
                }
}

// alpha 0 is GPTQ exactly; gptq_quantize refuses gptaq and gptaq_quantize needs it; a bad alpha
// or a non-finite cross term is named.
TEST(gptaq, alpha_zero_is_gptq_and_errors_are_named) {
    ops_context  ctx;
    auto         c = make_gptaq_case(16, 64, 13, 0.3f);
    gptq_options o;
    o.group_size = 32;
    auto plain   = gptq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), o);
    ASSERT_TRUE(plain.is_ok());
    o.gptaq       = true;
    o.gptaq_alpha = 0.0;
    auto zero     = gptaq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), c.d.data(), o);
    ASSERT_TRUE(zero.is_ok()) << zero.error().message();
    EXPECT_EQ(zero->codes, plain->codes);
    EXPECT_EQ(zero->scales, plain->scales);

    auto refused = gptq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), o);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_NE(refused.error().message().find("gptaq_quantize"), std::string::npos);
    gptq_options off;
    auto         not_asked = gptaq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), c.d.data(), off);
    ASSERT_FALSE(not_asked.is_ok());
    o.gptaq_alpha = 1.5;
    auto bad      = gptaq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), c.d.data(), o);
    ASSERT_FALSE(bad.is_ok());
    EXPECT_NE(bad.error().message().find("gptaq_alpha 1.5"), std::string::npos) << bad.error().message();
    o.gptaq_alpha           = 0.25;
    c.d[size_t(3 * 64 + 5)] = NAN;
    auto nan                = gptaq_quantize(ctx, c.w.data(), 16, 64, c.h.data(), c.d.data(), o);
    ASSERT_FALSE(nan.is_ok());
    EXPECT_NE(nan.error().message().find("cross term"), std::string::npos) << nan.error().message();
    EXPECT_NE(nan.error().message().find("[3, 5]"), std::string::npos) << nan.error().message();
}

// Where the quantized model's inputs are a linear distortion of the full-precision ones, GPTQ
// ignores the mismatch and GPTAQ compensates it through the later columns: its output error
// against the full-precision layer (sum |W~ x_q - W x_fp|^2) must be lower, by far at 8 bits
// (rounding negligible, the mismatch dominates) and clearly at 4 bits; with alpha 1 more than
// with 0.25. Act-order and GAR keep the gain.
TEST(gptaq, lowers_the_output_error_against_the_full_precision_layer) {
    thread_pool pool(2);
    ops_context ctx{&pool, false};
    const auto  c = make_gptaq_case(32, 128, 14, 0.3f);
    for (int bits : {8, 4})
        for (int order = 0; order < 3; ++order) {
            gptq_options o;
            o.bits       = bits;
            o.group_size = 32;
            o.desc_act   = order == 1;
            o.gar        = order == 2;
            auto g       = gptq_quantize(ctx, c.w.data(), c.n_out, 128, c.h.data(), o);
            ASSERT_TRUE(g.is_ok());
            o.gptaq       = true;
            auto a025     = gptaq_quantize(ctx, c.w.data(), c.n_out, 128, c.h.data(), c.d.data(), o);
            o.gptaq_alpha = 1.0;
            auto a1       = gptaq_quantize(ctx, c.w.data(), c.n_out, 128, c.h.data(), c.d.data(), o);
            ASSERT_TRUE(a025.is_ok() && a1.is_ok());
            const double eg = output_error(c.s, c.w, dequant(*g), c.n_out);
            const double e1 = output_error(c.s, c.w, dequant(*a1), c.n_out);
            const double e4 = output_error(c.s, c.w, dequant(*a025), c.n_out);
            SCOPED_TRACE(testing::Message() << "bits " << bits << " order " << order << ": gptq " << eg
                                            << " gptaq 0.25 " << e4 << " gptaq 1 " << e1);
            EXPECT_LT(e1, (bits == 8 ? 0.5 : 0.8) * eg);
            EXPECT_LT(e4, eg);
            EXPECT_LT(e1, e4);
        }
}
