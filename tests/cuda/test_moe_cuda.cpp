// The sparse MoE block on the GPU (model/llama_cuda_moe.h, ops/ops_cuda_moe.h, kernels/cuda/moe.cu):
// - ops against plain CPU references over many shapes: the router's softmax + top-k against the
//   CPU's own moe_route (ties, k = 1, 2, 8, 4 .. 256 experts, 1 .. 300 tokens), the grouped int4 and
//   F16 expert linears (act-order, partial output tiles, unaligned inputs), row gathers, the
//   weighted sum;
// - the MoE test models (tests/data/moe: Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE)
//   against the CPU model: prefill + decode (graph and op by op, grouped and per-expert experts),
//   greedy tokens, ragged decode of several sequences against each alone, perplexity through the
//   engine, int4 checkpoints (RTN, and GPTQ with act-order) made here from make-random micro models;
// - GPU calibration of MoE layers: the layer runner's hooks and outputs against the CPU layer,
//   quantize --device cuda against --device cpu.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "cuda_model_util.h"
#include "cuda_test_util.h"
#include "gptq/make_random.h"
#include "gptq/ppl.h"
#include "gptq/quantize.h"
#include "gptq_test_layer.h"
#include "mixed_check.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "model/llama_cuda_layer.h"
#include "ops/ops_cuda.h"
#include "ops/ops_cuda_moe.h"
#include "test_util.h"

using namespace gptq;

namespace {

// GPU model vs CPU model and graph vs op by op: test_llama_cuda's bounds (F16 weights and
// activations against F32; summation order only).
constexpr double k_f16_logits_rel_tol = 3e-2;
constexpr double k_graph_rel_tol      = 5e-3;
// Router weights: the GPU's F32 softmax (expf, a warp's sum) against the CPU's (std::exp, a
// sequential sum): a few F32 ulps.
constexpr double k_topk_weight_rtol = 1e-5;
// Grouped linears against a double reference: one F16 output rounding (2^-11) plus F32 summation
// (relative to the output RMS), as test_ops_cuda's bound for two kernels.
constexpr double k_rtol     = 2.0 / 1024;
constexpr double k_atol_rel = 4e-4;

constexpr int64_t k_n_prefill = 40;
constexpr int64_t k_n_decode  = 8;

std::string source_dir() {
    return test::cuda_source_dir();
}
std::string moe_dir(const char* name) {
    return source_dir() + "/tests/data/moe/" + name;
}

thread_pool& pool2() {
    static thread_pool p(2);
    return p;
}

std::unique_ptr<cuda_context> make_ctx() {
    auto c = cuda_context::create(0);
    EXPECT_TRUE(c.is_ok()) << c.error().message();
    return c.is_ok() ? std::move(*c) : nullptr;
}

void expect_close_f16(const std::vector<uint16_t>& got, const std::vector<double>& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double ss = 0;
    for (double v : want) ss += v * v;
    const double atol = k_atol_rel * std::sqrt(ss / double(std::max<size_t>(want.size(), 1)));
    int          bad  = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double x = f16_to_f32(got[i]), y = want[i];
        if (!(std::fabs(x - y) <= k_rtol * std::fabs(y) + atol) && bad++ < 5)
            ADD_FAILURE() << what << " index " << i << ": " << x << " vs " << y;
    }
    EXPECT_EQ(bad, 0) << what;
}

// ---- top-k --------------------------------------------------------------------------------------

// Router logits of n tokens: normal values; every third token rounded to multiples of 0.5 (many
// exact ties, which torch.topk breaks by the lower index); token 1 all equal.
std::vector<float> router_logits(std::mt19937& rng, int64_t n, int64_t n_expert) {
    std::normal_distribution<float> d(0.0f, 1.5f);
    std::vector<float>              v(static_cast<size_t>(n * n_expert));
    for (auto& x : v) x = d(rng);
    for (int64_t t = 0; t < n; ++t)
        for (int64_t e = 0; e < n_expert; ++e) {
            float& x = v[size_t(t * n_expert + e)];
            if (t % 3 == 2) x = std::round(x * 2.0f) / 2.0f;
            if (t == 1) x = 0.25f;
        }
    return v;
}

// The CPU's routing (model/llama_moe.cpp moe_route) of logits: an identity router [E, E] over x =
// the logits (each logit is one product by 1 plus products by 0: exact).
moe_routing cpu_route(const std::vector<float>& logits, int64_t n, int64_t n_expert, int64_t k, bool renorm) {
    llama_hparams hp;
    hp.n_expert      = n_expert;
    hp.n_expert_used = k;
    hp.moe_renorm    = renorm;
    llama_moe moe;
    moe.router.n_out = n_expert;
    moe.router.n_in  = n_expert;
    moe.router.w.assign(static_cast<size_t>(n_expert * n_expert), 0.0f);
    for (int64_t e = 0; e < n_expert; ++e) moe.router.w[size_t(e * n_expert + e)] = 1.0f;
    return moe_route(ops_context{}, hp, moe, logits.data(), n);
}

TEST(moe_cuda_ops, topk_matches_cpu_route) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    std::mt19937 rng(19);
    for (int64_t n_expert : {4, 8, 31, 60, 64, 100, 128, 256})
        for (int64_t k : {1, 2, 8})
            for (int64_t n : {1, 2, 5, 33, 300})
                for (bool renorm : {false, true}) {
                    if (k > n_expert) continue;
                    const std::string what = "E=" + std::to_string(n_expert) + " k=" + std::to_string(k) +
                                             " n=" + std::to_string(n) + " renorm=" + std::to_string(renorm);
                    const auto                  logits = router_logits(rng, n, n_expert);
                    const moe_routing           want   = cpu_route(logits, n, n_expert, k, renorm);
                    test::device_array<float>   dl(logits), dw(static_cast<size_t>(n * k));
                    test::device_array<int32_t> di(static_cast<size_t>(n * k));
                    GPTQ_EXPECT_OK(op_cuda_moe_topk(*ctx, dl.get(), n, n_expert, k, renorm, di.get(), dw.get()));
                    const auto ids = di.download();
                    const auto w   = dw.download();
                    int        bad = 0;
                    for (size_t i = 0; i < ids.size(); ++i) {
                        const bool ok = ids[i] == want.expert[i] &&
                                        std::fabs(w[i] - want.weight[i]) <= k_topk_weight_rtol * want.weight[i];
                        if (!ok && bad++ < 4)
                            ADD_FAILURE() << what << " pair " << i << ": expert " << ids[i] << " weight " << w[i]
                                          << ", CPU " << want.expert[i] << " " << want.weight[i];
                    }
                    EXPECT_EQ(bad, 0) << what;
                }
}

TEST(moe_cuda_ops, topk_refuses_shapes_it_cannot_run) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    test::device_array<float>   dl(static_cast<size_t>(2048)), dw(static_cast<size_t>(64));
    test::device_array<int32_t> di(static_cast<size_t>(64));
    EXPECT_FALSE(op_cuda_moe_topk(*ctx, dl.get(), 1, 8, 9, false, di.get(), dw.get()).is_ok());     // k > E
    EXPECT_FALSE(op_cuda_moe_topk(*ctx, dl.get(), 1, 2048, 2, false, di.get(), dw.get()).is_ok());  // E > 1024
    EXPECT_FALSE(op_cuda_moe_topk(*ctx, dl.get(), 1, 64, 33, false, di.get(), dw.get()).is_ok());   // k > 32
}

// ---- grouped linears -------------------------------------------------------------------------------

// n tokens, each with k distinct random experts of n_expert (pair p = t * k + j).
std::vector<int32_t> random_routing(std::mt19937& rng, int64_t n, int64_t k, int64_t n_expert) {
    std::vector<int32_t> ids, order(static_cast<size_t>(n_expert));
    std::iota(order.begin(), order.end(), 0);
    for (int64_t t = 0; t < n; ++t) {
        std::shuffle(order.begin(), order.end(), rng);
        ids.insert(ids.end(), order.begin(), order.begin() + k);
    }
    return ids;
}

// y[p] = x[p / x_div] W_{ids[p]}^T in double; w[e]: [n_out, n_in].
std::vector<double> grouped_reference(const std::vector<std::vector<double>>& w, const std::vector<int32_t>& ids,
                                      const std::vector<uint16_t>& x, int64_t x_stride, int64_t x_div, int64_t n_out,
                                      int64_t n_in) {
    const int64_t       n_pairs = int64_t(ids.size());
    std::vector<double> y(static_cast<size_t>(n_pairs * n_out));
    for (int64_t p = 0; p < n_pairs; ++p) {
        const std::vector<double>& we = w[size_t(ids[size_t(p)])];
        const uint16_t*            xr = x.data() + (p / x_div) * x_stride;
        for (int64_t o = 0; o < n_out; ++o) {
            double s = 0;
            for (int64_t i = 0; i < n_in; ++i) s += double(f16_to_f32(xr[i])) * we[size_t(o * n_in + i)];
            y[size_t(p * n_out + o)] = s;
        }
    }
    return y;
}

struct grouped_case {
    int64_t n_expert, n_out, n_in, group;
    bool    act_order;
};

// The grouped int4 linear over experts `cases` against the double reference: k = 1, 2, 8 experts per
// token, 1 .. 16 tokens, inputs per token (x_div = k) or per pair (padded rows), and rows that are
// not 16-byte aligned (gathered first).
void check_grouped_int4(const std::vector<grouped_case>& cases, uint32_t seed) {
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    if (ctx->sm_version() < 80) GTEST_SKIP() << "the int4 layout needs sm_80+";
    std::mt19937 rng(seed);
    for (const grouped_case& gc : cases) {
        std::vector<test::gptq_layer>     layers;
        std::vector<cuda_gptq_linear>     dev;
        std::vector<std::vector<double>>  w;
        std::vector<cuda_moe_expert_ptrs> table;
        bool                              any_perm = false;
        for (int64_t e = 0; e < gc.n_expert; ++e) {
            const bool act = gc.act_order && e % 2 == 0;  // some experts permuted, some not
            layers.push_back(test::gptq_layer_random(rng, gc.n_out, gc.n_in, gc.group, 4, act, e % 3 != 0,
                                                     gptq_checkpoint_format::GPTQ_FORMAT_V2));
            const test::gptq_layer& L = layers.back();
            gptq_host_tensors       t;
            t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data();
            t.g_idx = L.g_idx.data(), t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups;
            t.bits = 4, t.group_size = gc.group, t.zero_add = 0;
            auto q = cuda_gptq_linear_load(*ctx, t);
            ASSERT_TRUE(q.is_ok()) << q.error().message();
            ASSERT_TRUE(q->fast);
            cuda_moe_expert_ptrs p;
            p.w      = q->weights.data();
            p.sz     = q->sz.data();
            p.perm   = q->perm.bytes() ? q->perm.as<int32_t>() : nullptr;
            any_perm = any_perm || p.perm;
            table.push_back(p);
            dev.push_back(std::move(*q));
            w.push_back(L.w);
        }
        auto tab = cuda_buffer::from_host(table.data(), table.size() * sizeof(cuda_moe_expert_ptrs));
        ASSERT_TRUE(tab.is_ok());
        cuda_moe_grouped_args g;
        g.table = tab->as<cuda_moe_expert_ptrs>(), g.n_out = gc.n_out, g.n_in = gc.n_in, g.group_size = gc.group;
        g.int4 = true, g.any_perm = any_perm;
        for (int64_t k : {1, 2, 8})
            for (int64_t n : {1, 3, 16}) {
                if (k > gc.n_expert) continue;
                for (int64_t x_div : {k, int64_t(1)}) {
                    const int64_t n_pairs = n * k, x_rows = x_div == 1 ? n_pairs : n;
                    // x_stride: rows padded (8 halves more: still 16-byte aligned), or exactly n_in.
                    const int64_t                x_stride = gc.n_in + (x_div == 1 ? 8 : 0);
                    const auto                   ids      = random_routing(rng, n, k, gc.n_expert);
                    const auto                   x        = test::random_f16(rng, size_t(x_rows * x_stride));
                    test::device_array<uint16_t> dx(x), dy(static_cast<size_t>(n_pairs * gc.n_out)),
                        work(static_cast<size_t>(n_pairs * gc.n_in));
                    test::device_array<int32_t> di(ids), order(static_cast<size_t>(n_pairs));
                    const std::string what = "E=" + std::to_string(gc.n_expert) + " " + std::to_string(gc.n_out) + "x" +
                                             std::to_string(gc.n_in) + " g" + std::to_string(gc.group) +
                                             " act=" + std::to_string(gc.act_order) + " k=" + std::to_string(k) +
                                             " n=" + std::to_string(n) + " div=" + std::to_string(x_div);
                    const auto want = grouped_reference(w, ids, x, x_stride, x_div, gc.n_out, gc.n_in);
                    GPTQ_EXPECT_OK(op_cuda_moe_grouped_linear(*ctx, g, di.get(), dx.get(), x_stride, x_div, n_pairs,
                                                              dy.get(), work.get()));
                    expect_close_f16(dy.download(), want, what);
                    // The blocks in expert order (the model's decode with several tokens): the same values.
                    const auto first = dy.download();
                    GPTQ_EXPECT_OK(op_cuda_moe_sort_pairs(*ctx, di.get(), n_pairs, gc.n_expert, order.get()));
                    GPTQ_EXPECT_OK(op_cuda_moe_grouped_linear(*ctx, g, di.get(), dx.get(), x_stride, x_div, n_pairs,
                                                              dy.get(), work.get(), order.get()));
                    EXPECT_EQ(dy.download(), first) << what << " (pairs in expert order)";
                }
            }
        // Rows that are not 16-byte aligned (x_stride odd): gathered into the work buffer first.
        const int64_t                n = 3, k = std::min<int64_t>(2, gc.n_expert), x_stride = gc.n_in + 1;
        const auto                   ids = random_routing(rng, n, k, gc.n_expert);
        const auto                   x   = test::random_f16(rng, size_t(n * x_stride));
        test::device_array<uint16_t> dx(x), dy(static_cast<size_t>(n * k * gc.n_out)),
            work(static_cast<size_t>(n * k * gc.n_in));
        test::device_array<int32_t> di(ids);
        GPTQ_EXPECT_OK(
            op_cuda_moe_grouped_linear(*ctx, g, di.get(), dx.get(), x_stride, k, n * k, dy.get(), work.get()));
        expect_close_f16(dy.download(), grouped_reference(w, ids, x, x_stride, k, gc.n_out, gc.n_in), "unaligned");
    }
}

TEST(moe_cuda_ops, grouped_int4_matches_reference) {  // small shapes (memcheck runs these)
    GPTQ_SKIP_WITHOUT_GPU();
    // Partial output tiles (40, 72: n_out % 32 != 0), one group (-1), act-order on some experts.
    check_grouped_int4(
        {{4, 64, 64, 32, false}, {8, 40, 96, 32, false}, {8, 72, 128, -1, false}, {16, 64, 128, 64, true}}, 7);
}
TEST(moe_cuda_ops, grouped_int4_large_matches_reference) {  // 128 experts, a Qwen3-30B-A3B expert's gate shape
    GPTQ_SKIP_WITHOUT_GPU();
    check_grouped_int4({{5, 256, 512, 128, true}, {128, 96, 256, 128, false}, {8, 768, 2048, 128, false}}, 8);
}

TEST(moe_cuda_ops, grouped_f16_matches_reference) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    std::mt19937 rng(11);
    // n_in % 8 != 0 (the scalar loop), n_out not a multiple of the block's 8 rows, biases on some.
    const grouped_case cases[] = {
        {4, 64, 64, 0, false}, {8, 37, 100, 0, false}, {60, 96, 128, 0, false}, {128, 33, 2048, 0, false}};
    for (const grouped_case& gc : cases) {
        std::vector<cuda_buffer>          wd, bd;
        std::vector<std::vector<double>>  w;
        std::vector<std::vector<double>>  bias;
        std::vector<cuda_moe_expert_ptrs> table;
        for (int64_t e = 0; e < gc.n_expert; ++e) {
            const auto h = test::random_f16(rng, size_t(gc.n_out * gc.n_in), 0.05f);
            auto       b = cuda_buffer::from_host(h.data(), h.size() * 2);
            ASSERT_TRUE(b.is_ok());
            cuda_moe_expert_ptrs p;
            p.w = b->data();
            std::vector<double> wf(h.size()), bf(static_cast<size_t>(gc.n_out), 0.0);
            for (size_t i = 0; i < h.size(); ++i) wf[i] = f16_to_f32(h[i]);
            if (e % 2 == 1) {
                const auto hb = test::random_f16(rng, size_t(gc.n_out), 0.5f);
                auto       bb = cuda_buffer::from_host(hb.data(), hb.size() * 2);
                ASSERT_TRUE(bb.is_ok());
                p.bias = bb->as<uint16_t>();
                for (size_t i = 0; i < hb.size(); ++i) bf[i] = f16_to_f32(hb[i]);
                bd.push_back(std::move(*bb));
            }
            wd.push_back(std::move(*b));
            w.push_back(std::move(wf));
            bias.push_back(std::move(bf));
            table.push_back(p);
        }
        auto tab = cuda_buffer::from_host(table.data(), table.size() * sizeof(cuda_moe_expert_ptrs));
        ASSERT_TRUE(tab.is_ok());
        cuda_moe_grouped_args g;
        g.table = tab->as<cuda_moe_expert_ptrs>(), g.n_out = gc.n_out, g.n_in = gc.n_in;
        for (int64_t k : {1, 2, 8})
            for (int64_t n : {1, 7, 16}) {
                if (k > gc.n_expert) continue;
                const int64_t                n_pairs = n * k, x_stride = gc.n_in;
                const auto                   ids = random_routing(rng, n, k, gc.n_expert);
                const auto                   x   = test::random_f16(rng, size_t(n * x_stride));
                test::device_array<uint16_t> dx(x), dy(static_cast<size_t>(n_pairs * gc.n_out));
                test::device_array<int32_t>  di(ids), order(static_cast<size_t>(n_pairs));
                GPTQ_EXPECT_OK(
                    op_cuda_moe_grouped_linear(*ctx, g, di.get(), dx.get(), x_stride, k, n_pairs, dy.get(), nullptr));
                auto want = grouped_reference(w, ids, x, x_stride, k, gc.n_out, gc.n_in);
                for (int64_t p = 0; p < n_pairs; ++p)
                    for (int64_t o = 0; o < gc.n_out; ++o)
                        want[size_t(p * gc.n_out + o)] += bias[size_t(ids[size_t(p)])][size_t(o)];
                const std::string what = "F16 E=" + std::to_string(gc.n_expert) + " " + std::to_string(gc.n_out) + "x" +
                                         std::to_string(gc.n_in) + " k=" + std::to_string(k) +
                                         " n=" + std::to_string(n);
                const auto first = dy.download();
                expect_close_f16(first, want, what);
                GPTQ_EXPECT_OK(op_cuda_moe_sort_pairs(*ctx, di.get(), n_pairs, gc.n_expert, order.get()));
                GPTQ_EXPECT_OK(op_cuda_moe_grouped_linear(*ctx, g, di.get(), dx.get(), x_stride, k, n_pairs, dy.get(),
                                                          nullptr, order.get()));
                EXPECT_EQ(dy.download(), first) << what << " (pairs in expert order)";
            }
    }
}

// ---- pair order ------------------------------------------------------------------------------------------

// op_cuda_moe_sort_pairs: a permutation of the pairs with their experts in ascending order, for 1 ..
// 8192 pairs over 4 .. 1024 experts (all pairs on one expert too).
TEST(moe_cuda_ops, sort_pairs_groups_by_expert) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    std::mt19937 rng(13);
    for (int64_t n_expert : {4, 8, 128, 1024})
        for (int64_t n_pairs : {1, 2, 33, 1000, 8192})
            for (bool one : {false, true}) {
                std::uniform_int_distribution<int32_t> d(0, int32_t(n_expert - 1));
                std::vector<int32_t>                   ids(static_cast<size_t>(n_pairs));
                for (auto& e : ids) e = one ? int32_t(n_expert - 1) : d(rng);
                test::device_array<int32_t> di(ids), order(static_cast<size_t>(n_pairs));
                GPTQ_EXPECT_OK(op_cuda_moe_sort_pairs(*ctx, di.get(), n_pairs, n_expert, order.get()));
                const auto        o = order.download();
                std::vector<bool> seen(ids.size(), false);
                for (size_t i = 0; i < o.size(); ++i) {
                    ASSERT_TRUE(o[i] >= 0 && o[i] < n_pairs && !seen[size_t(o[i])]) << "not a permutation at " << i;
                    seen[size_t(o[i])] = true;
                    if (i > 0) ASSERT_LE(ids[size_t(o[i - 1])], ids[size_t(o[i])]) << "not grouped at " << i;
                }
            }
}

// ---- gather and combine ----------------------------------------------------------------------------

TEST(moe_cuda_ops, gather_rows_copies_rows) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    std::mt19937 rng(3);
    for (int64_t dim : {1, 64, 99}) {
        const int64_t                      n = 17, x_stride = dim + 5, n_rows = 40;
        const auto                         x = test::random_f16(rng, size_t(n * x_stride));
        std::vector<int32_t>               rows(static_cast<size_t>(n_rows));
        std::uniform_int_distribution<int> r(0, int(n - 1));
        for (auto& v : rows) v = r(rng);
        test::device_array<uint16_t> dx(x), dy(static_cast<size_t>(n_rows * dim));
        test::device_array<int32_t>  dr(rows);
        GPTQ_EXPECT_OK(op_cuda_moe_gather_rows(*ctx, dx.get(), x_stride, dr.get(), n_rows, dim, dy.get()));
        const auto y = dy.download();
        for (int64_t a = 0; a < n_rows; ++a)
            for (int64_t c = 0; c < dim; ++c)
                ASSERT_EQ(y[size_t(a * dim + c)], x[size_t(rows[size_t(a)] * x_stride + c)]) << a << " " << c;
    }
}

// The weighted sum: F32 sums in ascending expert order, with and without the shared expert and its
// sigmoid gate, with the rows of each pair permuted (pos) or in pair order.
TEST(moe_cuda_ops, combine_matches_reference) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = make_ctx();
    ASSERT_TRUE(ctx);
    std::mt19937 rng(5);
    for (int64_t k : {1, 2, 8})
        for (int64_t n : {1, 9, 300})
            for (int64_t dim : {8, 300})
                for (int mode = 0; mode < 3; ++mode) {  // 0: plain; 1: pos + shared with gate; 2: shared, no gate
                    const int64_t        n_pairs = n * k;
                    const auto           ids     = random_routing(rng, n, k, 16);
                    const auto           out     = test::random_f16(rng, size_t(n_pairs * dim));
                    const auto           sh      = test::random_f16(rng, size_t(n * dim));
                    std::vector<float>   w(static_cast<size_t>(n_pairs)), logit(static_cast<size_t>(n));
                    std::vector<int32_t> pos(static_cast<size_t>(n_pairs));
                    std::uniform_real_distribution<float> u(0.0f, 1.0f);
                    for (auto& v : w) v = u(rng);
                    for (auto& v : logit) v = 4.0f * u(rng) - 2.0f;
                    std::iota(pos.begin(), pos.end(), 0);
                    std::shuffle(pos.begin(), pos.end(), rng);
                    test::device_array<uint16_t> dout(out), dsh(sh), dy(static_cast<size_t>(n * dim));
                    test::device_array<int32_t>  dids(ids), dpos(pos);
                    test::device_array<float>    dw(w), dl(logit);
                    const bool                   use_pos = mode == 1, shared = mode != 0, gate = mode == 1;
                    GPTQ_EXPECT_OK(op_cuda_moe_combine(*ctx, dout.get(), use_pos ? dpos.get() : nullptr, dids.get(),
                                                       dw.get(), n, k, dim, shared ? dsh.get() : nullptr,
                                                       gate ? dl.get() : nullptr, dy.get()));
                    std::vector<double> want(static_cast<size_t>(n * dim), 0.0);
                    for (int64_t t = 0; t < n; ++t)
                        for (int64_t c = 0; c < dim; ++c) {
                            double s = 0;
                            for (int64_t j = 0; j < k; ++j) {
                                const int64_t p = t * k + j, r = use_pos ? pos[size_t(p)] : p;
                                s += double(f16_to_f32(out[size_t(r * dim + c)])) * w[size_t(p)];
                            }
                            if (shared)
                                s += (gate ? 1.0 / (1.0 + std::exp(-double(logit[size_t(t)]))) : 1.0) *
                                     f16_to_f32(sh[size_t(t * dim + c)]);
                            want[size_t(t * dim + c)] = s;
                        }
                    expect_close_f16(dy.download(), want,
                                     "combine k=" + std::to_string(k) + " n=" + std::to_string(n) +
                                         " dim=" + std::to_string(dim) + " mode=" + std::to_string(mode));
                }
}

// ---- the models ----------------------------------------------------------------------------------------

double row_rel_error(const float* got, const float* want, int64_t n) {
    double max_diff = 0, max_ref = 0;
    for (int64_t i = 0; i < n; ++i) {
        max_diff = std::max(max_diff, std::fabs(double(got[i]) - double(want[i])));
        max_ref  = std::max(max_ref, std::fabs(double(want[i])));
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

// CPU logits: the first min(k_n_prefill, n) tokens in one pass through a KV cache, then one per step.
std::vector<float> cpu_logits(const std::string& dir, const std::vector<int32_t>& ids) {
    auto m = llama_model::open(dir);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m.is_ok()) return {};
    const int64_t      V = (*m)->hparams().n_vocab, n = static_cast<int64_t>(ids.size());
    std::vector<float> out(static_cast<size_t>(n * V));
    const ops_context  ctx{&pool2(), false};
    const int64_t      n_pre = std::min(k_n_prefill, n);
    kv_cache           cache = kv_cache::create((*m)->hparams(), n);
    auto               st    = (*m)->forward(ctx, ids.data(), n_pre, &cache, out.data());
    EXPECT_TRUE(st.is_ok()) << st.message();
    for (int64_t t = n_pre; t < n && st.is_ok(); ++t)
        st = (*m)->forward(ctx, ids.data() + t, 1, &cache, out.data() + t * V);
    EXPECT_TRUE(st.is_ok()) << st.message();
    return out;
}

struct gpu_run {
    std::vector<float> logits;
    bool               grouped = false;
    bool               graph   = false;
    int64_t            n_fast = 0, n_generic = 0;
};

// GPU prefill of k_n_prefill tokens, then k_n_decode decode steps.
gpu_run gpu_logits(const std::string& dir, const std::vector<int32_t>& ids, bool graph, bool moe_grouped) {
    llama_cuda_options o;
    o.graph       = graph;
    o.n_ctx       = 64;
    o.moe_grouped = moe_grouped;
    auto m        = llama_cuda_model::open(dir, o);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m.is_ok()) return {};
    gpu_run       r;
    const int64_t V = (*m)->hparams().n_vocab;
    r.logits.resize(ids.size() * static_cast<size_t>(V));
    const status st = (*m)->prefill(ids.data(), k_n_prefill, r.logits.data());
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st.is_ok()) return {};
    for (int64_t t = k_n_prefill; t < k_n_prefill + k_n_decode; ++t) {
        const status sd = (*m)->decode(ids[static_cast<size_t>(t)], r.logits.data() + t * V);
        EXPECT_TRUE(sd.is_ok()) << "decode " << t << ": " << sd.message();
        if (!sd.is_ok()) return {};
    }
    r.grouped   = (*m)->moe_decode_grouped();
    r.graph     = (*m)->graph_active();
    r.n_fast    = (*m)->n_gptq_fast();
    r.n_generic = (*m)->n_gptq_generic();
    if (graph && r.grouped) EXPECT_EQ((*m)->graph_replays(), k_n_decode - 1) << dir;
    return r;
}

// The model against the CPU: grouped experts with and without the graph, per-expert experts (no
// graph); every row within the F16 bound of the CPU's, decode rows of the runs within the
// summation-order bound of each other. expect_grouped: whether the experts can run grouped.
void check_moe_model(const std::string& dir, bool expect_grouped) {
    auto host = llama_model::open(dir);
    ASSERT_TRUE(host.is_ok()) << host.error().message();
    const int64_t V   = (*host)->hparams().n_vocab;
    const auto    ids = test::cuda_test_ids(k_n_prefill + k_n_decode, V);
    const auto    cpu = cpu_logits(dir, ids);
    ASSERT_FALSE(cpu.empty());
    const gpu_run plain       = gpu_logits(dir, ids, false, true);
    const gpu_run graph       = gpu_logits(dir, ids, true, true);
    const gpu_run host_routed = gpu_logits(dir, ids, true, false);
    ASSERT_FALSE(plain.logits.empty() || graph.logits.empty() || host_routed.logits.empty());
    EXPECT_EQ(plain.grouped, expect_grouped) << dir;
    EXPECT_EQ(graph.graph, expect_grouped) << dir << ": the decode graph runs exactly when the experts are grouped";
    EXPECT_FALSE(host_routed.grouped);
    EXPECT_FALSE(host_routed.graph) << dir << ": per-expert decode brings the routing to the host (no graph)";
    for (int64_t t = 0; t < k_n_prefill + k_n_decode; ++t) {
        const char* what = t < k_n_prefill ? "prefill" : "decode";
        for (const auto* r : {&plain, &graph, &host_routed})
            EXPECT_LE(row_rel_error(r->logits.data() + t * V, cpu.data() + t * V, V), k_f16_logits_rel_tol)
                << dir << " " << what << " row " << t
                << (r == &plain   ? " (grouped, no graph)"
                    : r == &graph ? " (grouped, graph)"
                                  : " (per expert)");
        if (t >= k_n_prefill) {
            EXPECT_LE(row_rel_error(graph.logits.data() + t * V, plain.logits.data() + t * V, V), k_graph_rel_tol)
                << dir << " decode row " << t << ": graph vs op by op";
            EXPECT_LE(row_rel_error(host_routed.logits.data() + t * V, plain.logits.data() + t * V, V), k_graph_rel_tol)
                << dir << " decode row " << t << ": per expert vs grouped";
        }
    }
}

// Greedy decoding on the GPU (grouped, graph): each token it picks has, on the CPU, a logit within
// the F16 bound of the CPU's top one (as test_llama_cuda's check_greedy).
void check_moe_greedy(const std::string& dir) {
    llama_cuda_options o;
    o.n_ctx = 64;
    auto m  = llama_cuda_model::open(dir, o);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const int64_t        V = (*m)->hparams().n_vocab, n_prompt = 10, n_new = 12;
    std::vector<int32_t> seq = test::cuda_test_ids(n_prompt, V);
    std::vector<float>   logits(static_cast<size_t>(V));
    GPTQ_EXPECT_OK((*m)->prefill(seq.data(), n_prompt, logits.data(), /*all_logits=*/false));
    for (int64_t i = 0; i < n_new; ++i) {
        const auto next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        seq.push_back(next);
        if (i + 1 < n_new) GPTQ_EXPECT_OK((*m)->decode(next, logits.data()));
    }
    const std::vector<int32_t> in(seq.begin(), seq.end() - 1);
    const auto                 cpu = cpu_logits(dir, in);
    ASSERT_FALSE(cpu.empty());
    for (int64_t i = 0; i < n_new; ++i) {
        const float* row  = cpu.data() + (n_prompt - 1 + i) * V;
        const float  top  = *std::max_element(row, row + V);
        float        amax = 0;
        for (int64_t j = 0; j < V; ++j) amax = std::max(amax, std::fabs(row[j]));
        EXPECT_GE(row[seq[size_t(n_prompt + i)]], top - k_f16_logits_rel_tol * amax) << dir << " token " << i;
    }
}

// Ragged decode: 4 sequences of different prompt lengths in 4 slots, decoded together (subsets, in
// changing order), each row against the sequence run alone on a one-slot model.
void check_moe_ragged(const std::string& dir) {
    auto host = llama_model::open(dir);
    ASSERT_TRUE(host.is_ok()) << host.error().message();
    const int64_t V = (*host)->hparams().n_vocab, n_seq = 4;
    struct seq_run {
        std::vector<int32_t>            prompt, steps;
        std::vector<std::vector<float>> got;
    };
    std::vector<seq_run> runs(static_cast<size_t>(n_seq));
    const auto           base = test::cuda_test_ids(64, V);
    for (int64_t r = 0; r < n_seq; ++r)
        for (int64_t t = 0; t < 2 + 5 * r; ++t)
            runs[size_t(r)].prompt.push_back(int32_t((base[size_t(t)] + 7 * r) % V));
    llama_cuda_options o;
    o.n_ctx = 48;
    auto m  = llama_cuda_model::open(dir, o);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    GPTQ_EXPECT_OK((*m)->sequences_reserve(n_seq));
    std::vector<float> row(static_cast<size_t>(V)), rows(static_cast<size_t>(n_seq * V));
    for (int64_t r = 0; r < n_seq; ++r) {
        seq_run& s = runs[size_t(r)];
        GPTQ_EXPECT_OK((*m)->prefill_seq(r, s.prompt.data(), int64_t(s.prompt.size()), row.data(), false));
        s.got.push_back(row);
    }
    for (int j = 0; j < 6; ++j) {
        std::vector<int64_t> which;
        for (int64_t r = 0; r < n_seq; ++r)
            if ((r + j) % 4 != 3) which.push_back(r);
        if (j % 2) std::reverse(which.begin(), which.end());
        std::vector<int32_t> ids;
        for (int64_t r : which) {
            seq_run& s = runs[size_t(r)];
            s.steps.push_back(int32_t((s.prompt.back() * 5 + 11 * int64_t(s.steps.size()) + r) % V));
            ids.push_back(s.steps.back());
        }
        GPTQ_EXPECT_OK((*m)->decode_seqs(ids.data(), which.data(), int64_t(ids.size()), rows.data()));
        for (size_t i = 0; i < which.size(); ++i)
            runs[size_t(which[i])].got.emplace_back(rows.begin() + int64_t(i) * V, rows.begin() + int64_t(i + 1) * V);
    }
    EXPECT_GT((*m)->graph_replays(), 0);
    auto a = llama_cuda_model::open(dir, o);
    ASSERT_TRUE(a.is_ok()) << a.error().message();
    for (size_t r = 0; r < runs.size(); ++r) {
        (*a)->reset();
        const seq_run& s = runs[r];
        GPTQ_EXPECT_OK((*a)->prefill(s.prompt.data(), int64_t(s.prompt.size()), row.data(), false));
        EXPECT_LE(row_rel_error(s.got[0].data(), row.data(), V), k_graph_rel_tol) << dir << " run " << r << " prompt";
        for (size_t j = 0; j < s.steps.size(); ++j) {
            GPTQ_EXPECT_OK((*a)->decode(s.steps[j], row.data()));
            EXPECT_LE(row_rel_error(s.got[1 + j].data(), row.data(), V), k_graph_rel_tol)
                << dir << " run " << r << " step " << j;
        }
    }
}

// An int4 checkpoint of make-random `like` (micro shapes, group 32), made once per tag.
std::string micro_int4(const std::string& like, const std::string& method, bool desc_act) {
    static test::temp_dir dir("cuda-moe-int4");
    const std::string     src = dir.file(like), out = dir.file(like + "-" + method + (desc_act ? "-act" : ""));
    if (std::filesystem::exists(out)) return out;
    if (!std::filesystem::exists(src)) {
        make_random_params mp;
        mp.like        = like;
        mp.output_path = src;
        mp.n_threads   = 2;
        mp.progress    = false;
        auto made      = make_random_model(mp);
        EXPECT_TRUE(made.is_ok()) << made.error().message();
    }
    quantize_params p;
    p.model_path  = src;
    p.output_path = out;
    p.method      = method;
    p.group_size  = 32;
    p.desc_act    = desc_act;
    p.calib       = source_dir() + "/data/calib/corpus-sample.txt";
    p.nsamples    = 4;
    p.seqlen      = 32;
    p.n_threads   = 2;
    auto r        = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return out;
}

}  // namespace

TEST(moe_cuda, mixtral_matches_cpu) {  // top-2 of 8, renormalised
    GPTQ_SKIP_WITHOUT_GPU();
    check_moe_model(moe_dir("mixtral"), true);
    check_moe_greedy(moe_dir("mixtral"));
}
TEST(moe_cuda, qwen2_moe_matches_cpu) {  // shared expert + sigmoid gate, no renormalisation, a dense layer
    GPTQ_SKIP_WITHOUT_GPU();
    check_moe_model(moe_dir("qwen2-moe"), true);
    check_moe_greedy(moe_dir("qwen2-moe"));
}
TEST(moe_cuda, qwen3_moe_matches_cpu) {  // top-4 of 8, q/k norms, dense first and last layers
    GPTQ_SKIP_WITHOUT_GPU();
    check_moe_model(moe_dir("qwen3-moe"), true);
    check_moe_greedy(moe_dir("qwen3-moe"));
}

TEST(moe_cuda, ragged_decode_matches_sequences_alone) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) check_moe_ragged(moe_dir(name));
}

// Mixed passes (prompt chunks beside decode tokens in one forward): the experts run per expert over
// all rows (the prefill path), against the separate passes (per-expert prefill, grouped decode as a
// graph): the summation-order bound, as per expert vs grouped above (tests/cuda/mixed_check.h).
TEST(moe_cuda, mixed_steps_match_separate_passes) {
    GPTQ_SKIP_WITHOUT_GPU();
    llama_cuda_options o;
    o.n_ctx     = 64;
    o.page_size = 4;
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) test::check_mixed_steps(moe_dir(name), o, {});
    o.page_size = 16;
    test::check_mixed_steps(micro_int4("micro-qwen3-moe", "rtn", false), o, {});
    test::check_mixed_steps(micro_int4("micro-mixtral", "gptq", true), o, {});
}

// Perplexity through the engine (model_session on cuda: windows of 128 tokens through the per-expert
// prefill with every row's logits) against the CPU's: test_llama_cuda's bound.
TEST(moe_cuda, ppl_on_cuda_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    constexpr double k_ppl_rel_tol = 2e-3;
    for (const char* like : {"micro-qwen2-moe", "micro-mixtral"}) {
        SCOPED_TRACE(like);
        test::temp_dir     dir("cuda-moe-ppl");
        make_random_params mp;
        mp.like        = like;
        mp.output_path = dir.file(like);
        mp.n_threads   = 2;
        mp.progress    = false;
        ASSERT_TRUE(make_random_model(mp).is_ok());
        ppl_params p;
        p.model_path  = mp.output_path;
        p.dataset     = source_dir() + "/data/wikitext2/wiki.test.raw.gptq_join.txt";
        p.seqlen      = 128;
        p.max_windows = 4;
        p.progress    = false;
        p.n_threads   = 2;
        auto cpu      = ppl_run(p);
        ASSERT_TRUE(cpu.is_ok()) << cpu.error().message();
        p.device = "cuda";
        auto gpu = ppl_run(p);
        ASSERT_TRUE(gpu.is_ok()) << gpu.error().message();
        EXPECT_EQ(gpu->n_predicted, cpu->n_predicted);
        EXPECT_NEAR(gpu->ppl / cpu->ppl, 1.0, k_ppl_rel_tol) << "cpu " << cpu->ppl << " cuda " << gpu->ppl;
    }
}

// Int4 experts: RTN (every expert on the int4 layout: grouped int4 decode, as a graph), and GPTQ
// with act-order (each expert its own permutation: the grouped kernels gather each pair's input in
// its expert's order).
TEST(moe_cuda, int4_rtn_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (const char* like : {"micro-qwen3-moe", "micro-qwen2-moe", "micro-mixtral"}) {
        const std::string dir = micro_int4(like, "rtn", false);
        check_moe_model(dir, true);
        check_moe_greedy(dir);
    }
    check_moe_ragged(micro_int4("micro-qwen3-moe", "rtn", false));
}
TEST(moe_cuda, int4_gptq_act_order_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = micro_int4("micro-mixtral", "gptq", true);
    check_moe_model(dir, true);
    check_moe_ragged(dir);
}

// ---- GPU calibration of MoE layers (llama_cuda_layer_runner, engine/calibration_cuda.cpp) ------------

namespace {
std::vector<float> f16_round(const std::vector<float>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = f16_to_f32(f32_to_f16(v[i]));
    return o;
}

double max_rel(const std::vector<float>& got, const std::vector<float>& want) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        md = std::max(md, std::fabs(double(got[i]) - double(want[i])));
        mr = std::max(mr, std::fabs(double(want[i])));
    }
    return mr > 0 ? md / mr : md;
}

// Each MoE layer of dir through the calibration runner (windows of 16 tokens in chunks of 2, the
// last partial) against llama_model::layer_forward window by window on the same F16-rounded
// inputs: the block input and every expert's inputs as the hooks see them (GATE_UP: the tokens
// routed to it; DOWN: with experts 0 and 3 route-all, every token), the output, and the output
// after an expert's down is changed in the host layer and moe_load'ed.
void check_moe_runner(const std::string& dir) {
    auto m = llama_model::open(dir);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const llama_hparams& hp = (*m)->hparams();
    auto                 cc = cuda_context::create(0);
    ASSERT_TRUE(cc.is_ok()) << cc.error().message();
    const int64_t seqlen = 16, n_windows = 5, n_embd = hp.n_embd, n_tok = seqlen * n_windows;
    auto          run = llama_cuda_layer_runner::create(**cc, hp, seqlen, 2 * seqlen);
    ASSERT_TRUE(run.is_ok()) << run.error().message();
    const ops_context               ctx{&pool2(), false};
    std::mt19937                    rng(23);
    std::normal_distribution<float> nd;
    std::vector<bool>               route_all(static_cast<size_t>(hp.n_expert), false);
    route_all[0] = route_all[3] = true;
    for (int64_t li = 0; li < hp.n_layer; ++li) {
        if (!hp.is_moe(li)) continue;
        SCOPED_TRACE(dir + " layer " + std::to_string(li));
        auto layer = (*m)->layer_load(li);
        ASSERT_TRUE(layer.is_ok()) << layer.error().message();
        std::vector<float> x(static_cast<size_t>(n_tok * n_embd));
        for (auto& v : x) v = nd(rng);
        x = f16_round(x);
        // CPU: per (input, expert) the captured rows, window by window; the output.
        std::map<std::pair<int, int64_t>, std::vector<float>> cap_cpu, cap_gpu;
        std::vector<float>                                    block_cpu, block_gpu;
        linear_input_hook hook = [&](int64_t, linear_input w, const float* xi, int64_t n, int64_t n_in) {
            if (w == linear_input::LINEAR_INPUT_GATE_UP) block_cpu.insert(block_cpu.end(), xi, xi + n * n_in);
        };
        std::vector<float> h;
        moe_input_hook     mhook = [&](int64_t, int64_t e, linear_input w, const float* xi, const int64_t*, int64_t n,
                                   int64_t n_in) {
            if (w == linear_input::LINEAR_INPUT_DOWN && e >= 0 && route_all[size_t(e)]) return;
            auto& c = cap_cpu[{int(w), e}];
            c.insert(c.end(), xi, xi + n * n_in);
        };
        std::vector<float> out_cpu = x;
        for (int64_t j = 0; j < n_windows; ++j) {
            float*             xj = out_cpu.data() + j * seqlen * n_embd;
            std::vector<float> in(xj, xj + seqlen * n_embd);
            (*m)->layer_forward(ctx, **layer, in.data(), seqlen, 0, nullptr, &hook, linear_input::LINEAR_INPUT_DOWN,
                                &mhook);
            // Route-all experts' down input over every token of the window (the CPU runner's rule).
            const std::vector<float> blk(block_cpu.end() - seqlen * n_embd, block_cpu.end());
            for (int64_t e = 0; e < hp.n_expert; ++e)
                if (route_all[size_t(e)]) {
                    moe_expert_hidden(ctx, hp, (*layer)->moe->expert(e), blk.data(), seqlen, &h);
                    auto& c = cap_cpu[{int(linear_input::LINEAR_INPUT_DOWN), e}];
                    c.insert(c.end(), h.begin(), h.end());
                }
            (*m)->layer_forward(ctx, **layer, xj, seqlen, 0, nullptr);
        }
        // GPU: the GATE_UP pass, the DOWN pass (route-all), then the full pass.
        std::vector<uint16_t> xh(x.size());
        for (size_t i = 0; i < x.size(); ++i) xh[i] = f32_to_f16(x[i]);
        auto xd = cuda_buffer::from_host(xh.data(), xh.size() * 2);
        ASSERT_TRUE(xd.is_ok());
        GPTQ_EXPECT_OK((*run)->load(**layer));
        auto grab = [&](const uint16_t* xi, int64_t n, int64_t n_in, std::vector<float>* to) -> status {
            std::vector<uint16_t> b(static_cast<size_t>(n * n_in));
            GPTQ_TRY(cuda_copy_to_host(**cc, b.data(), xi, b.size() * 2));
            for (uint16_t v : b) to->push_back(f16_to_f32(v));
            return status::ok();
        };
        cuda_linear_input_hook ghook = [&](linear_input w, const uint16_t* xi, int64_t n, int64_t n_in) -> status {
            return w == linear_input::LINEAR_INPUT_GATE_UP ? grab(xi, n, n_in, &block_gpu) : status::ok();
        };
        for (linear_input stop : {linear_input::LINEAR_INPUT_GATE_UP, linear_input::LINEAR_INPUT_DOWN}) {
            cuda_moe_input_hook gm = [&](int64_t e, linear_input w, const uint16_t* xi, int64_t n,
                                         int64_t n_in) -> status {
                return w == stop ? grab(xi, n, n_in, &cap_gpu[{int(w), e}]) : status::ok();
            };
            GPTQ_EXPECT_OK((*run)->forward(xd->as<uint16_t>(), n_windows,
                                           stop == linear_input::LINEAR_INPUT_GATE_UP ? &ghook : nullptr, stop, &gm,
                                           stop == linear_input::LINEAR_INPUT_DOWN ? &route_all : nullptr));
        }
        std::vector<uint16_t> back(xh.size());
        GPTQ_EXPECT_OK(cuda_copy_to_host(**cc, back.data(), xd->data(), back.size() * 2));
        EXPECT_EQ(back, xh) << "a capture pass changed the inputs";
        ASSERT_EQ(block_gpu.size(), block_cpu.size());
        EXPECT_LE(max_rel(block_gpu, block_cpu), k_f16_logits_rel_tol) << "block input";
        EXPECT_EQ(cap_gpu.size(), cap_cpu.size());
        for (const auto& [key, want] : cap_cpu) {
            const auto& got = cap_gpu[key];
            ASSERT_EQ(got.size(), want.size())
                << linear_input_name(linear_input(key.first)) << " expert " << key.second;
            EXPECT_LE(max_rel(got, want), k_f16_logits_rel_tol)
                << linear_input_name(linear_input(key.first)) << " expert " << key.second;
        }
        GPTQ_EXPECT_OK((*run)->forward(xd->as<uint16_t>(), n_windows, nullptr));
        GPTQ_EXPECT_OK(cuda_copy_to_host(**cc, back.data(), xd->data(), back.size() * 2));
        std::vector<float> out_gpu(back.size());
        for (size_t i = 0; i < back.size(); ++i) out_gpu[i] = f16_to_f32(back[i]);
        EXPECT_LE(max_rel(out_gpu, out_cpu), k_f16_logits_rel_tol) << "output";
        // An expert's down halved in the host layer, then moe_load: the outputs move together.
        linear_weights& d = (*layer)->moe->expert(1).linear(moe_proj::MOE_DOWN);
        for (auto& v : d.w) v *= 0.5f;
        std::vector<float> out2_cpu = x;
        for (int64_t j = 0; j < n_windows; ++j)
            (*m)->layer_forward(ctx, **layer, out2_cpu.data() + j * seqlen * n_embd, seqlen, 0, nullptr);
        GPTQ_EXPECT_OK((*run)->moe_load(**layer));
        GPTQ_EXPECT_OK(cuda_copy_to_device_async(**cc, xd->data(), xh.data(), xh.size() * 2));
        GPTQ_EXPECT_OK((*run)->forward(xd->as<uint16_t>(), n_windows, nullptr));
        GPTQ_EXPECT_OK(cuda_copy_to_host(**cc, back.data(), xd->data(), back.size() * 2));
        for (size_t i = 0; i < back.size(); ++i) out_gpu[i] = f16_to_f32(back[i]);
        EXPECT_LE(max_rel(out_gpu, out2_cpu), k_f16_logits_rel_tol) << "after moe_load";
        EXPECT_GT(max_rel(out2_cpu, out_cpu), 1e-4) << "the change did nothing";
    }
}

// logits of the CPU model on ids (one pass).
std::vector<float> cpu_forward(const std::string& dir, const std::vector<int32_t>& ids) {
    auto m = llama_model::open(dir);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m.is_ok()) return {};
    std::vector<float> out(ids.size() * static_cast<size_t>((*m)->hparams().n_vocab));
    EXPECT_TRUE((*m)->forward({&pool2(), false}, ids.data(), int64_t(ids.size()), nullptr, out.data()).is_ok());
    return out;
}
}  // namespace

TEST(moe_cuda, layer_runner_matches_cpu_layer_forward) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) check_moe_runner(moe_dir(name));
}

// quantize --device cuda on MoE models (the shared expert, act-order, route-all experts:
// --moe-min-tokens at the mean count) against --device cpu: the same experts' token counts (within
// k_count_slack: the GPU's F16 routing may move a near tie), both coverage kinds used, and the GPU's
// checkpoint as close to the original model as the CPU's (the CPU model's logits of each against
// the unquantized model's: the GPU's error at most k_quality_factor times the CPU's).
constexpr int64_t k_count_slack    = 4;
constexpr double  k_quality_factor = 1.5;
TEST(moe_cuda, quantize_on_cuda_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    test::temp_dir dir("cuda-moe-quantize");
    for (const char* like : {"micro-qwen2-moe", "micro-mixtral"}) {
        SCOPED_TRACE(like);
        make_random_params mp;
        mp.like        = like;
        mp.output_path = dir.file(like);
        mp.n_threads   = 2;
        mp.progress    = false;
        ASSERT_TRUE(make_random_model(mp).is_ok());
        std::vector<quantize_report> reports;
        for (const char* device : {"cpu", "cuda"}) {
            quantize_params p;
            p.model_path     = mp.output_path;
            p.output_path    = dir.file(std::string(like) + "-" + device);
            p.device         = device;
            p.group_size     = 32;
            p.desc_act       = true;
            p.calib          = source_dir() + "/data/calib/corpus-sample.txt";
            p.nsamples       = 4;
            p.seqlen         = 32;
            p.n_threads      = 2;
            p.moe_min_tokens = 32;  // 128 tokens x top-2 of 8: 32 on average, so some under it: route-all
            auto r           = quantize_model(p);
            ASSERT_TRUE(r.is_ok()) << device << ": " << r.error().message();
            reports.push_back(*r);
        }
        ASSERT_EQ(reports[0].linears.size(), reports[1].linears.size());
        int n_routed = 0, n_route_all = 0;
        for (size_t i = 0; i < reports[0].linears.size(); ++i) {
            const auto &a = reports[0].linears[i], &b = reports[1].linears[i];
            ASSERT_EQ(a.name, b.name);
            EXPECT_LE(std::abs(a.tokens - b.tokens), k_count_slack) << a.name;
            if (a.coverage == "routed") ++n_routed;
            if (a.coverage == "route-all") ++n_route_all;
        }
        EXPECT_GT(n_routed, 0);
        EXPECT_GT(n_route_all, 0);
        const auto ids  = test::cuda_test_ids(24, 512);
        const auto orig = cpu_forward(mp.output_path, ids);
        const auto cpu  = cpu_forward(dir.file(std::string(like) + "-cpu"), ids);
        const auto cuda = cpu_forward(dir.file(std::string(like) + "-cuda"), ids);
        ASSERT_FALSE(orig.empty() || cpu.empty() || cuda.empty());
        double e_cpu = 0, e_cuda = 0;
        for (int64_t t = 0; t < 24; ++t) {
            e_cpu  = std::max(e_cpu, row_rel_error(cpu.data() + t * 512, orig.data() + t * 512, 512));
            e_cuda = std::max(e_cuda, row_rel_error(cuda.data() + t * 512, orig.data() + t * 512, 512));
        }
        EXPECT_GT(e_cpu, 0.0);
        EXPECT_LE(e_cuda, k_quality_factor * e_cpu + 1e-3) << "cpu " << e_cpu << " cuda " << e_cuda;
    }
}
