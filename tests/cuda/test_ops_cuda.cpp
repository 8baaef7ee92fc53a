// ops_cuda dispatch: a GPTQ layer loaded through cuda_gptq_linear_load takes the fast int4 path
// when it can and the generic kernel otherwise, and both give the same outputs (within the F16
// output rounding) on fresh random layers with and without act-order; the attention op picks the
// decode or the prefill kernel and both agree.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "cuda_test_util.h"
#include "io/gptq_pack.h"
#include "ops/ops_cuda.h"

namespace gptq {
namespace {

// Two kernels, each within one F16 output rounding (2^-11) of the exact value, plus summation
// order differences (relative to the output RMS).
constexpr double k_rtol     = 2.0 / 1024;
constexpr double k_atol_rel = 4e-4;

void expect_agree(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size());
    double ss = 0;
    for (auto v : b) ss += double(f16_to_f32(v)) * f16_to_f32(v);
    const double atol = k_atol_rel * std::sqrt(ss / double(b.size()));
    int          bad  = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double x = f16_to_f32(a[i]), y = f16_to_f32(b[i]);
        if (!(std::fabs(x - y) <= k_rtol * std::fabs(y) + atol) && bad++ < 5)
            ADD_FAILURE() << what << " index " << i << ": " << x << " vs " << y;
    }
    EXPECT_EQ(bad, 0) << what;
}

// Host <-> device copies: sizes around the pinned staging thresholds (4 MiB, 16 MiB chunks), offsets
// inside a buffer, pageable and pinned host memory, through cuda_buffer (synchronous) and the
// context's stream functions; fresh random bytes each run, every byte compared after a round trip.
TEST(OpsCuda, CopiesRoundTripAtEverySize) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    const size_t   MiB = size_t(1) << 20;
    for (size_t n : {size_t(1), size_t(4093), 4 * MiB - 1, 4 * MiB, 16 * MiB, 16 * MiB + 3, 37 * MiB + 5}) {
        std::vector<uint8_t> src(n), back(n), back2(n);
        for (auto& b : src) b = uint8_t(rng());
        const size_t off = n % 3;  // an unaligned offset inside the device buffer
        auto         d   = cuda_buffer::alloc(n + off);
        ASSERT_TRUE(d.is_ok());
        ASSERT_TRUE(d->upload(src.data(), n, off).is_ok());
        ASSERT_TRUE(d->download(back.data(), n, off).is_ok());
        ASSERT_TRUE(back == src) << "cuda_buffer round trip of " << n << " bytes, seed " << seed;
        // Stream functions: a second device buffer written from the first one's host copy.
        auto d2 = cuda_buffer::alloc(n);
        ASSERT_TRUE(d2.is_ok());
        std::vector<uint8_t> src2(src.rbegin(), src.rend());
        ASSERT_TRUE(cuda_copy_to_device_async(**ctx, d2->data(), src2.data(), n).is_ok());
        ASSERT_TRUE(cuda_copy_to_host(**ctx, back2.data(), d2->data(), n).is_ok());
        ASSERT_TRUE(std::equal(back2.begin(), back2.end(), src.rbegin())) << "stream round trip of " << n << " bytes";
        // Pinned host memory on both sides (no staging).
        auto ph = cuda_host_buffer::alloc(n);
        ASSERT_TRUE(ph.is_ok());
        std::memcpy(ph->data(), src.data(), n);
        ASSERT_TRUE(cuda_copy_to_device_async(**ctx, d2->data(), ph->data(), n).is_ok());
        ASSERT_TRUE(ctx->get()->synchronize().is_ok());
        std::memset(ph->data(), 0, n);
        ASSERT_TRUE(cuda_copy_to_host(**ctx, ph->data(), d2->data(), n).is_ok());
        ASSERT_EQ(std::memcmp(ph->data(), src.data(), n), 0) << "pinned round trip of " << n << " bytes";
    }
}

TEST(OpsCuda, GptqFastAndGenericAgree) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (bool act : {false, true})
        for (int64_t gs : {int64_t(128), int64_t(-1)}) {
            const int64_t                      n_out = 520, n_in = 1024, G = gs == -1 ? 1 : n_in / gs, m = 5;
            std::vector<uint8_t>               codes(size_t(n_out * n_in));
            std::uniform_int_distribution<int> c(0, 15);
            for (auto& v : codes) v = uint8_t(c(rng));
            std::vector<int32_t> zeros(size_t(G * n_out));
            for (auto& z : zeros) z = c(rng);
            std::vector<uint16_t>                 scales(size_t(G * n_out));
            std::uniform_real_distribution<float> sd(0.001f, 0.03f);
            for (auto& s : scales) s = f32_to_f16(sd(rng));
            std::vector<int32_t> order(static_cast<size_t>(n_in)), g_idx(static_cast<size_t>(n_in));
            std::iota(order.begin(), order.end(), 0);
            if (act) std::shuffle(order.begin(), order.end(), rng);
            for (int64_t i = 0; i < n_in; ++i) g_idx[size_t(order[size_t(i)])] = int32_t(gs == -1 ? 0 : i / gs);
            std::vector<int32_t> qweight(size_t(n_in / 8 * n_out)), qzeros(size_t(G * n_out / 8));
            gptq_pack_qweight(codes.data(), n_out, n_in, 4, qweight.data());
            ASSERT_TRUE(
                gptq_pack_qzeros(zeros.data(), G, n_out, 4, gptq_checkpoint_format::GPTQ_FORMAT_V2, qzeros.data())
                    .is_ok());
            auto              bias = test::random_f16(rng, size_t(n_out));
            gptq_host_tensors t;
            t.qweight = qweight.data(), t.qzeros = qzeros.data(), t.scales = scales.data(), t.g_idx = g_idx.data();
            t.bias = bias.data(), t.n_out = n_out, t.n_in = n_in, t.n_groups = G, t.bits = 4, t.group_size = gs;
            auto fast    = cuda_gptq_linear_load(**ctx, t, true);
            auto generic = cuda_gptq_linear_load(**ctx, t, false);
            ASSERT_TRUE(fast.is_ok()) << fast.error().message();
            ASSERT_TRUE(generic.is_ok()) << generic.error().message();
            EXPECT_EQ(fast->fast, (*ctx)->sm_version() >= 80);
            EXPECT_FALSE(generic->fast);
            EXPECT_EQ(fast->perm.bytes() > 0, act && gs != -1 && fast->fast);
            auto x  = test::random_f16(rng, size_t(m * n_in));
            auto dx = cuda_buffer::from_host(x.data(), x.size() * 2);
            auto y1 = cuda_buffer::alloc(size_t(m * n_out) * 2), y2 = cuda_buffer::alloc(size_t(m * n_out) * 2);
            ASSERT_TRUE(dx && y1 && y2);
            GPTQ_EXPECT_OK(op_cuda_gptq_linear(**ctx, *fast, dx->as<uint16_t>(), y1->as<uint16_t>(), m));
            GPTQ_EXPECT_OK(op_cuda_gptq_linear(**ctx, *generic, dx->as<uint16_t>(), y2->as<uint16_t>(), m));
            GPTQ_EXPECT_OK((*ctx)->synchronize());
            std::vector<uint16_t> a(size_t(m * n_out)), b(a.size());
            GPTQ_EXPECT_OK(y1->download(a.data(), a.size() * 2));
            GPTQ_EXPECT_OK(y2->download(b.data(), b.size() * 2));
            expect_agree(a, b,
                         "act=" + std::to_string(act) + " gs=" + std::to_string(gs) + " seed " + std::to_string(seed));
        }
}

TEST(OpsCuda, AttentionDecodeAndPrefillAgree) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    // 8 queries at the end of a 700-token cache: n_q <= 16 takes the decode kernel; the same
    // call with 17 queries (the last 8 compared) takes the prefill kernel.
    const int64_t n_kv = 700, H = 8, Hkv = 2, D = 128, stride = H * D, kv_stride = Hkv * D;
    auto          q = test::random_f16(rng, size_t(17 * stride)), k = test::random_f16(rng, size_t(n_kv * kv_stride)),
         v  = test::random_f16(rng, size_t(n_kv * kv_stride));
    auto dq = cuda_buffer::from_host(q.data(), q.size() * 2), dk = cuda_buffer::from_host(k.data(), k.size() * 2),
         dv = cuda_buffer::from_host(v.data(), v.size() * 2);
    auto o1 = cuda_buffer::alloc(size_t(8 * stride) * 2), o2 = cuda_buffer::alloc(size_t(17 * stride) * 2);
    ASSERT_TRUE(dq && dk && dv && o1 && o2);
    cuda_attention_args a;
    a.k = dk->as<uint16_t>(), a.v = dv->as<uint16_t>(), a.n_kv = n_kv, a.n_head = H, a.n_head_kv = Hkv;
    a.head_dim = D, a.scale = 0.088f, a.q_stride = stride, a.kv_stride = kv_stride, a.out_stride = stride;
    a.q = dq->as<uint16_t>() + 9 * stride, a.out = o1->as<uint16_t>(), a.n_q = 8, a.q_pos0 = n_kv - 8;
    GPTQ_EXPECT_OK(op_cuda_attention(**ctx, a));
    a.q = dq->as<uint16_t>(), a.out = o2->as<uint16_t>(), a.n_q = 17, a.q_pos0 = n_kv - 17;
    GPTQ_EXPECT_OK(op_cuda_attention(**ctx, a));
    GPTQ_EXPECT_OK((*ctx)->synchronize());
    std::vector<uint16_t> r1(size_t(8 * stride)), r2(size_t(17 * stride));
    GPTQ_EXPECT_OK(o1->download(r1.data(), r1.size() * 2));
    GPTQ_EXPECT_OK(o2->download(r2.data(), r2.size() * 2));
    expect_agree(r1, std::vector<uint16_t>(r2.begin() + 9 * stride, r2.end()), "seed " + std::to_string(seed));
}

}  // namespace
}  // namespace gptq
