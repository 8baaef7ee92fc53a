// GPTQ linear kernels on the GPU against a plain dequantize-then-matmul reference (double) on the
// CPU: the generic kernel for every bits / group size / act-order / sym-asym / v1-v2 combination,
// and the fast int4 kernel (repack + GEMV) for group sizes -1/32/64/128, act-order, sym/asym,
// m = 1..33, awkward n_out, every kernel variant forced and the automatic choice. Checkpoint
// tensors are made by io/gptq_pack, the writer's own packer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>

#include "cuda_test_util.h"
#include "io/gptq_pack.h"
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/gptq_int4.cuh"
#include "kernels/cuda/gptq_linear.cuh"
#include "kernels/cuda/norm.cuh"

namespace gptq {
namespace {

using test::device_array;

// The kernels multiply exact F16 activations by exactly representable (q - zero) and scales in F32
// (the int4 kernel: F16 x F16 products on tensor cores, exact, summed in F32), so the one visible
// rounding is the F16 output: 2^-11 relative; allow two roundings. The absolute part covers F32
// summation-order differences after cancellation, relative to the RMS of the reference.
constexpr double k_rtol     = 1.0 / 1024;
constexpr double k_atol_rel = 2e-4;

struct layer {
    int64_t                n_out, n_in, n_groups, group_size;
    int                    bits;
    gptq_checkpoint_format format;
    std::vector<int32_t>   qweight, qzeros, g_idx;
    std::vector<uint16_t>  scales;
    std::vector<double>    w;  // dequantized [n_out, n_in]
};

// Random layer. act_order: g_idx from a random column order (groups non-contiguous in k).
layer make_layer(std::mt19937& rng, int64_t n_out, int64_t n_in, int64_t group_size, int bits, bool act_order, bool sym,
                 gptq_checkpoint_format format) {
    layer         L{n_out, n_in, 0, group_size, bits, format, {}, {}, {}, {}, {}};
    const int64_t gs = group_size == -1 ? n_in : group_size;
    L.n_groups       = (n_in + gs - 1) / gs;
    std::vector<int32_t> order(static_cast<size_t>(n_in));
    std::iota(order.begin(), order.end(), 0);
    if (act_order) std::shuffle(order.begin(), order.end(), rng);
    L.g_idx.resize(size_t(n_in));
    for (int64_t i = 0; i < n_in; ++i) L.g_idx[size_t(order[size_t(i)])] = int32_t(i / gs);
    const int                          qmax = (1 << bits) - 1;
    std::uniform_int_distribution<int> code(0, qmax),
        zlo(format == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, qmax);
    std::uniform_real_distribution<float> sc(0.002f, 0.05f);
    std::vector<uint8_t>                  codes(static_cast<size_t>(n_out * n_in));
    for (auto& c : codes) c = uint8_t(code(rng));
    std::vector<int32_t> zeros(static_cast<size_t>(L.n_groups * n_out));
    for (auto& z : zeros) z = sym ? (1 << (bits - 1)) : zlo(rng);
    L.scales.resize(size_t(L.n_groups * n_out));
    for (auto& s : L.scales) s = f32_to_f16(sc(rng));
    L.qweight.resize(size_t(gptq_packed_words(n_in, bits) * n_out));
    L.qzeros.resize(size_t(L.n_groups * gptq_packed_words(n_out, bits)));
    gptq_pack_qweight(codes.data(), n_out, n_in, bits, L.qweight.data());
    EXPECT_TRUE(gptq_pack_qzeros(zeros.data(), L.n_groups, n_out, bits, format, L.qzeros.data()).is_ok());
    L.w.resize(size_t(n_out * n_in));
    for (int64_t n = 0; n < n_out; ++n)
        for (int64_t k = 0; k < n_in; ++k) {
            const int64_t g           = L.g_idx[size_t(k)];
            L.w[size_t(n * n_in + k)] = double(f16_to_f32(L.scales[size_t(g * n_out + n)])) *
                                        (double(codes[size_t(n * n_in + k)]) - zeros[size_t(g * n_out + n)]);
        }
    return L;
}

std::vector<double> reference(const layer& L, const std::vector<uint16_t>& x, int64_t m,
                              const std::vector<uint16_t>& bias) {
    std::vector<double> y(static_cast<size_t>(m * L.n_out));
    for (int64_t r = 0; r < m; ++r)
        for (int64_t n = 0; n < L.n_out; ++n) {
            double s = bias.empty() ? 0.0 : f16_to_f32(bias[size_t(n)]);
            for (int64_t k = 0; k < L.n_in; ++k)
                s += f16_to_f32(x[size_t(r * L.n_in + k)]) * L.w[size_t(n * L.n_in + k)];
            y[size_t(r * L.n_out + n)] = s;
        }
    return y;
}

void expect_close(const std::vector<uint16_t>& got, int64_t y_stride, const std::vector<double>& ref, int64_t m,
                  int64_t n_out, const std::string& what) {
    double ss = 0;
    for (double v : ref) ss += v * v;
    const double atol = k_atol_rel * std::sqrt(ss / double(ref.size()));
    int          bad  = 0;
    for (int64_t r = 0; r < m; ++r)
        for (int64_t n = 0; n < n_out; ++n) {
            const double g = f16_to_f32(got[size_t(r * y_stride + n)]), e = ref[size_t(r * n_out + n)];
            if (!(std::fabs(g - e) <= k_rtol * std::fabs(e) + atol) && bad++ < 5)
                ADD_FAILURE() << what << ": row " << r << " col " << n << " gpu " << g << " ref " << e;
        }
    EXPECT_EQ(bad, 0) << what;
}

std::string describe(const layer& L, int64_t m, bool act, bool sym, uint32_t seed) {
    return "bits=" + std::to_string(L.bits) + " gs=" + std::to_string(L.group_size) + " act=" + std::to_string(act) +
           " sym=" + std::to_string(sym) + " v" + (L.format == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? "1" : "2") +
           " m=" + std::to_string(m) + " n_out=" + std::to_string(L.n_out) + " n_in=" + std::to_string(L.n_in) +
           " seed=" + std::to_string(seed);
}

TEST(CudaGptq, GenericKernelEveryCombination) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t m, n_out, n_in;
    };
    const std::vector<shape> shapes = {{1, 32, 64}, {3, 96, 96}, {9, 256, 320}, {17, 64, 1024}};
    int                      runs   = 0;
    for (int bits : {2, 3, 4, 8})
        for (int64_t gs : {int64_t(-1), int64_t(32), int64_t(128), int64_t(48)})
            for (bool act : {false, true})
                for (bool sym : {false, true})
                    for (auto fmt : {gptq_checkpoint_format::GPTQ_FORMAT_V1, gptq_checkpoint_format::GPTQ_FORMAT_V2}) {
                        const shape&          s = shapes[size_t(runs++) % shapes.size()];
                        layer                 L = make_layer(rng, s.n_out, s.n_in, gs, bits, act, sym, fmt);
                        auto                  x = test::random_f16(rng, size_t(s.m * s.n_in));
                        std::vector<uint16_t> bias;
                        if (runs % 3 == 0) bias = test::random_f16(rng, size_t(s.n_out));
                        const int64_t            y_stride = s.n_out + (runs % 2);
                        device_array<int32_t>    dq(L.qweight), dz(L.qzeros), dg(L.g_idx);
                        device_array<uint16_t>   ds(L.scales), dx(x), db(bias), dy(size_t(s.m * y_stride));
                        cuda::gptq_linear_params p;
                        p.qweight = dq.get(), p.qzeros = dz.get(), p.scales = ds.get(), p.g_idx = dg.get();
                        p.bias  = bias.empty() ? nullptr : db.get();
                        p.n_out = s.n_out, p.n_in = s.n_in, p.n_groups = L.n_groups, p.bits = bits;
                        p.zero_add = fmt == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0;
                        GPTQ_EXPECT_OK(
                            cuda::gptq_linear_generic_f16(p, dx.get(), dy.get(), s.m, s.n_in, y_stride, nullptr));
                        expect_close(dy.download(), y_stride, reference(L, x, s.m, bias), s.m, s.n_out,
                                     describe(L, s.m, act, sym, seed));
                    }
}

TEST(CudaGptq, GenericKernelRejectsBadBits) {
    GPTQ_SKIP_WITHOUT_GPU();
    cuda::gptq_linear_params p;
    p.bits = 5, p.n_out = 32, p.n_in = 32, p.n_groups = 1;
    const status st = cuda::gptq_linear_generic_f16(p, nullptr, nullptr, 1, 32, 32, nullptr);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("bits 5"), std::string::npos) << st.message();
}

TEST(CudaGptq, Int4ActOrderPermutation) {
    // Host-only logic, but in this file with the kernel it serves.
    std::vector<int32_t> perm;
    std::vector<int32_t> trivial = {0, 0, 1, 1};
    ASSERT_TRUE(cuda::int4_act_order_perm(trivial.data(), 4, 2, perm).is_ok());
    EXPECT_TRUE(perm.empty());
    std::vector<int32_t> shuffled = {1, 0, 1, 0};
    ASSERT_TRUE(cuda::int4_act_order_perm(shuffled.data(), 4, 2, perm).is_ok());
    EXPECT_EQ(perm, (std::vector<int32_t>{1, 3, 0, 2}));
    std::vector<int32_t> uneven = {0, 0, 0, 1};
    const status         st     = cuda::int4_act_order_perm(uneven.data(), 4, 2, perm);
    EXPECT_EQ(st.code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_FALSE(cuda::int4_layout_for(64, 48, 32).is_ok());  // n_in not a multiple of 32
    EXPECT_FALSE(cuda::int4_layout_for(64, 128, 48).is_ok());
}

// variant: -1 the automatic choice, else a forced kernel variant (cuda::int4_gemv_variant_name).
// x_pad: halves of padding after each activation row (poisoned with NaN: never read), so x_stride
// = n_in + x_pad; the pipelined variants need x_stride % 8 == 0, the automatic choice takes the
// batched kernel otherwise.
void run_int4(std::mt19937& rng, uint32_t seed, int64_t n_out, int64_t n_in, int64_t gs, bool act, bool sym,
              gptq_checkpoint_format fmt, const std::vector<int64_t>& ms, int unroll, int splits, int variant = -1,
              int64_t x_pad = 0) {
    layer L   = make_layer(rng, n_out, n_in, gs, 4, act, sym, fmt);
    auto  lay = cuda::int4_layout_for(n_out, n_in, gs);
    ASSERT_TRUE(lay.is_ok()) << lay.error().message();
    std::vector<int32_t> perm;
    GPTQ_EXPECT_OK(cuda::int4_act_order_perm(L.g_idx.data(), n_in, gs, perm));
    EXPECT_EQ(perm.empty(), !act || gs == -1 || gs == n_in);  // one group: nothing to sort
    device_array<int32_t>  dq(L.qweight), dz(L.qzeros), dperm(perm);
    device_array<uint16_t> ds(L.scales);
    device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
    GPTQ_EXPECT_OK(cuda::int4_repack(*lay, dq.get(), dz.get(), ds.get(), perm.empty() ? nullptr : dperm.get(),
                                     fmt == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, dw.get(), dsz.get(),
                                     nullptr));
    // Split-K workspace: counters zero before the first launch (and left zero by every launch).
    const int64_t         ws_bytes = cuda::int4_gemv_workspace_bytes(*lay, splits);
    device_array<uint8_t> ws(static_cast<size_t>(ws_bytes));
    if (ws_bytes) {
        ASSERT_EQ(cudaMemset(ws.get(), 0, size_t(ws_bytes)), cudaSuccess);
    }
    const int64_t x_stride = n_in + x_pad;
    for (int64_t m : ms) {
        auto                  x    = test::random_f16(rng, size_t(m * n_in));
        std::vector<uint16_t> bias = (m % 2) ? test::random_f16(rng, size_t(n_out)) : std::vector<uint16_t>{};
        std::vector<uint16_t> xs(static_cast<size_t>(m * x_stride), uint16_t(0xFFFF));  // padding: F16 NaN
        for (int64_t r = 0; r < m; ++r)
            std::copy(x.begin() + r * n_in, x.begin() + (r + 1) * n_in, xs.begin() + r * x_stride);
        const int64_t          y_stride = n_out + 8 * (m % 3);
        device_array<uint16_t> dx(xs), dxp(size_t(m * x_stride)), db(bias), dy(size_t(m * y_stride));
        const uint16_t*        xin = dx.get();
        if (!perm.empty()) {
            GPTQ_EXPECT_OK(
                cuda::gptq_permute_cols_f16(dx.get(), dperm.get(), dxp.get(), m, n_in, x_stride, x_stride, nullptr));
            xin = dxp.get();
        }
        GPTQ_EXPECT_OK(cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), xin, bias.empty() ? nullptr : db.get(), dy.get(),
                                           m, x_stride, y_stride, ws.get(), ws_bytes, nullptr, unroll, splits,
                                           variant));
        expect_close(dy.download(), y_stride, reference(L, x, m, bias), m, n_out,
                     describe(L, m, act, sym, seed) + " unroll=" + std::to_string(unroll) +
                         " splits=" + std::to_string(splits) + " variant=" +
                         (variant < 0 ? std::string("auto(") +
                                            cuda::int4_gemv_variant_name(
                                                cuda::int4_gemv_auto_variant(*lay, std::min<int64_t>(m, 16))) +
                                            ")"
                                      : std::string(cuda::int4_gemv_variant_name(variant))) +
                         " x_stride=" + std::to_string(x_stride));
    }
}

// Every kernel variant forced, over group sizes -1/32/64/128, act-order, sym/asym, v1/v2, awkward
// n_out (not multiples of the 32-row tile, nor of 2 or 4 tiles per block), k from one step (most
// warps idle) to 5504 (uneven warp ranges that start inside a group), m = 1..16 (and 17, 33: two
// launches), padded activation rows.
TEST(CudaGptq, Int4GemvEveryVariant) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t n_out, n_in;
    };
    // n_in multiples of 128 except the 32- and 96-wide ones (those only with gs -1 or 32).
    const std::vector<shape>   shapes = {{40, 256}, {264, 1024}, {1000, 384}, {96, 2048},
                                         {8, 32},   {168, 96},   {360, 5504}, {4104, 128}};
    const std::vector<int64_t> all_m  = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 33};
    const std::vector<int64_t> some_m = {1, 3, 8, 9, 16, 17};
    for (int v = 0; v < cuda::int4_gemv_variant_count(); ++v)
        for (int i = 0; i < 8; ++i) {
            const int64_t gs_list[4] = {-1, 32, 64, 128};
            const shape&  s          = shapes[size_t((i + 3 * v) % 8)];
            int64_t       gs         = gs_list[i % 4];
            if (gs > 0 && s.n_in % gs != 0) gs = 32;
            const bool act = (i / 2) % 2 == 1, sym = (i + v) % 3 == 0;
            const auto fmt =
                (i + v) % 2 ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
            run_int4(rng, seed, s.n_out, s.n_in, gs, act, sym, fmt, i == 0 ? all_m : some_m, 0, v == 0 ? 1 + i % 3 : 0,
                     v, i % 3 == 2 ? 8 : 0);
        }
}

// All pipelined variants (1 ..) sum each column in the same order (16 k chunks, a binary tree over
// them), so their outputs are bit for bit the same; the automatic choice may then depend on n_out
// (a fused q/k/v projection gives the same bits as its parts). k from 1 to 43 steps: chunks empty,
// of unequal lengths, starting inside groups.
TEST(CudaGptq, Int4GemvPipelinedVariantsBitIdentical) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t n_out, n_in, gs;
    };
    for (const shape& s :
         std::vector<shape>{{200, 32, -1}, {72, 96, 32}, {136, 1376, 32}, {264, 1280, 128}, {48, 512, 64}}) {
        layer L   = make_layer(rng, s.n_out, s.n_in, s.gs, 4, false, false, gptq_checkpoint_format::GPTQ_FORMAT_V2);
        auto  lay = cuda::int4_layout_for(s.n_out, s.n_in, s.gs);
        ASSERT_TRUE(lay.is_ok());
        device_array<int32_t>  dq(L.qweight), dz(L.qzeros);
        device_array<uint16_t> ds(L.scales);
        device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
        GPTQ_EXPECT_OK(cuda::int4_repack(*lay, dq.get(), dz.get(), ds.get(), nullptr, 0, dw.get(), dsz.get(), nullptr));
        for (int64_t m : {1, 5, 8, 9, 16}) {
            auto                   x    = test::random_f16(rng, size_t(m * s.n_in));
            auto                   bias = test::random_f16(rng, size_t(s.n_out));
            device_array<uint16_t> dx(x), db(bias), dy(size_t(m * s.n_out));
            std::vector<uint16_t>  first;
            for (int v = 1; v < cuda::int4_gemv_variant_count(); ++v) {
                GPTQ_EXPECT_OK(cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), dx.get(), db.get(), dy.get(), m, s.n_in,
                                                   s.n_out, nullptr, 0, nullptr, 0, 0, v));
                const auto got = dy.download();
                if (v == 1) {
                    first = got;
                    expect_close(got, s.n_out, reference(L, x, m, bias), m, s.n_out,
                                 "bit-identity base, m=" + std::to_string(m) + " seed=" + std::to_string(seed));
                } else {
                    EXPECT_EQ(std::memcmp(got.data(), first.data(), got.size() * 2), 0)
                        << cuda::int4_gemv_variant_name(v) << " vs " << cuda::int4_gemv_variant_name(1)
                        << ": n_out=" << s.n_out << " n_in=" << s.n_in << " m=" << m << " seed=" << seed;
                }
            }
        }
    }
}

// Activation rows whose stride is not a multiple of 8 halves: the automatic choice falls back to the
// batched kernel; a forced pipelined variant (or one with split-K) is refused, not run.
TEST(CudaGptq, Int4GemvVariantArguments) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    run_int4(rng, seed, 264, 1024, 128, true, false, gptq_checkpoint_format::GPTQ_FORMAT_V2, {1, 9, 16}, 0, 0, -1, 2);
    run_int4(rng, seed, 96, 256, -1, false, true, gptq_checkpoint_format::GPTQ_FORMAT_V1, {4, 12}, 0, 0, -1, 6);
    auto lay = cuda::int4_layout_for(64, 256, 128);
    ASSERT_TRUE(lay.is_ok());
    ASSERT_GE(cuda::int4_gemv_variant_count(), 2);
    for (int64_t m : {1, 8, 9, 16, 40}) {
        const int v = cuda::int4_gemv_auto_variant(*lay, m);
        EXPECT_TRUE(v >= 0 && v < cuda::int4_gemv_variant_count()) << v;
    }
    for (int v = 0; v < cuda::int4_gemv_variant_count(); ++v)
        for (int w = 0; w < v; ++w) EXPECT_STRNE(cuda::int4_gemv_variant_name(v), cuda::int4_gemv_variant_name(w));
    device_array<uint16_t> x(size_t(2 * 264)), y(size_t(2 * 64));
    device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
    const int64_t          ws_bytes = cuda::int4_gemv_workspace_bytes(*lay, 2);
    device_array<uint8_t>  ws(static_cast<size_t>(ws_bytes));
    for (int v = 1; v < cuda::int4_gemv_variant_count(); ++v) {
        status st = cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), x.get(), nullptr, y.get(), 2, 258, 64, nullptr, 0,
                                        nullptr, 0, 0, v);
        EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT) << cuda::int4_gemv_variant_name(v);
        st = cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), x.get(), nullptr, y.get(), 2, 256, 64, ws.get(), ws_bytes,
                                 nullptr, 0, 2, v);
        EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT) << cuda::int4_gemv_variant_name(v);
    }
    const status st = cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), x.get(), nullptr, y.get(), 2, 256, 64, nullptr, 0,
                                          nullptr, 0, 0, cuda::int4_gemv_variant_count());
    EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT);
}

TEST(CudaGptq, Int4GemvMatchesReference) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t             seed = test::fresh_seed();
    std::mt19937               rng(seed);
    const std::vector<int64_t> ms = {1, 2, 3, 7, 8, 9, 15, 16, 17, 33};
    int                        i  = 0;
    for (int64_t gs : {int64_t(-1), int64_t(32), int64_t(64), int64_t(128)})
        for (bool act : {false, true})
            for (bool sym : {false, true}) {
                const auto fmt =
                    (i % 2) ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
                const int unroll = (i % 2 == 0) ? 0 : 8;
                // Awkward n_out (not a multiple of the 32-row tile), several k lengths.
                const int64_t n_out = std::vector<int64_t>{40, 264, 1000, 96}[size_t(i % 4)];
                const int64_t n_in  = std::vector<int64_t>{256, 1024, 384, 2048}[size_t(i % 4)];
                if (gs > 0 && n_in % gs != 0) {
                    ++i;
                    continue;
                }
                // Splits: automatic, none, and an explicit odd count (uneven k ranges per block).
                const int splits = std::vector<int>{0, 1, 3}[size_t(i % 3)];
                run_int4(rng, seed, n_out, n_in, gs, act, sym, fmt, ms, unroll, splits);
                ++i;
            }
}

TEST(CudaGptq, Int4GemvLlamaShape) {
    GPTQ_SKIP_WITHOUT_GPU();
#ifdef GPTQ_SANITIZE
    GTEST_SKIP() << "large shape skipped in sanitizer builds";
#endif
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    run_int4(rng, seed, 4096, 4096, 128, true, false, gptq_checkpoint_format::GPTQ_FORMAT_V2, {1, 4, 16}, 8, 0);
    run_int4(rng, seed, 512, 11008, 128, false, true, gptq_checkpoint_format::GPTQ_FORMAT_V1, {1, 5}, 8, 5);
}

// ---- the fused decode step's GEMV (int4_gemv_fused_f16) against the plain ops, bit for bit ----------

enum class fused_mode { NORM, NORM_SILU, RES, SILU, RES_NORM };

const char* mode_name(fused_mode f) {
    switch (f) {
        case fused_mode::NORM:
            return "norm";
        case fused_mode::NORM_SILU:
            return "norm+silu";
        case fused_mode::RES:
            return "residual";
        case fused_mode::SILU:
            return "silu";
        case fused_mode::RES_NORM:
            return "residual+output norm";
    }
    return "?";
}

// The epilogue modes without the input norm (x already in the layer's order): SILU against
// int4_gemv_f16 then silu_mul_f16 over the interleaved rows; RES_NORM against int4_gemv_f16 then
// add_rms_norm_f16 (the residual stream h, the norm of the updated stream into x_out, in a random
// column order when `act`), both outputs and the counter (zero again) compared; RES_NORM runs twice
// on the same counter, so a counter not left zero shows in the second launch.
void check_epilogue(std::mt19937& rng, const std::string& what, fused_mode mode, const cuda::int4_layout& lay,
                    const uint8_t* dw, const uint8_t* dsz, int64_t m, bool act, const uint16_t* bp, int variant) {
    const int64_t          n_out = lay.n_out, n_in = lay.n_in;
    auto                   x = test::random_f16(rng, size_t(m * n_in));
    device_array<uint16_t> dx(x), dfull(size_t(m * n_out));
    GPTQ_EXPECT_OK(cuda::int4_gemv_f16(lay, dw, dsz, dx.get(), bp, dfull.get(), m, n_in, n_out, nullptr, 0, nullptr));
    auto compare = [&](const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, int64_t width,
                       const char* which) {
        ASSERT_EQ(got.size(), want.size()) << what;
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i)
            if (got[i] != want[i] && bad++ < 5)
                ADD_FAILURE() << what << " " << which << ": element " << i << " (row " << i / size_t(width) << " col "
                              << i % size_t(width) << ") fused " << f16_to_f32(got[i]) << " plain "
                              << f16_to_f32(want[i]);
        EXPECT_EQ(bad, 0) << what << " " << which;
    };
    if (mode == fused_mode::SILU) {
        const int64_t          n_y = n_out / 2;
        device_array<uint16_t> dref(size_t(m * n_y)), dgot(size_t(m * n_y));
        GPTQ_EXPECT_OK(cuda::silu_mul_f16(dfull.get(), dfull.get() + 16, dref.get(), m, n_y, n_out, n_out, n_y, nullptr,
                                          nullptr, 16));
        cuda::int4_gemv_fusion f;
        f.silu = true;
        GPTQ_EXPECT_OK(
            cuda::int4_gemv_fused_f16(lay, dw, dsz, dx.get(), bp, dgot.get(), m, n_in, n_y, f, nullptr, variant));
        compare(dgot.download(), dref.download(), n_y, "silu");
        return;
    }
    auto h  = test::random_f16(rng, size_t(m * n_out), 3.0f);
    auto nw = test::random_f16(rng, size_t(n_out), 0.3f);
    for (auto& v : nw) v = f32_to_f16(1.0f + f16_to_f32(v));
    std::vector<int32_t> perm;
    if (act) {
        perm.resize(size_t(n_out));
        for (int64_t i = 0; i < n_out; ++i) perm[size_t(i)] = int32_t(i);
        std::shuffle(perm.begin(), perm.end(), rng);
    }
    device_array<int32_t>  dperm(perm);
    const int32_t*         pp  = perm.empty() ? nullptr : dperm.get();
    const float            eps = 1e-6f;
    device_array<uint16_t> dnw(nw), dh_ref(h), dx_ref(size_t(m * n_out)), dh_got(h), dx_got(size_t(m * n_out));
    device_array<unsigned> dcount(std::vector<unsigned>{0u});
    GPTQ_EXPECT_OK(cuda::add_rms_norm_f16(dh_ref.get(), dfull.get(), dnw.get(), dx_ref.get(), pp, m, n_out, n_out,
                                          n_out, n_out, eps, nullptr));
    cuda::int4_gemv_fusion f;
    f.residual   = true;
    f.out_norm_w = dnw.get(), f.out_eps = eps, f.out_perm = pp;
    f.x_out = dx_got.get(), f.x_out_stride = n_out, f.counter = dcount.get();
    GPTQ_EXPECT_OK(
        cuda::int4_gemv_fused_f16(lay, dw, dsz, dx.get(), bp, dh_got.get(), m, n_in, n_out, f, nullptr, variant));
    compare(dh_got.download(), dh_ref.download(), n_out, "residual");
    compare(dx_got.download(), dx_ref.download(), n_out, "output norm");
    EXPECT_EQ(dcount.download(), std::vector<unsigned>{0u}) << what << ": the counter is left zero";
    // Again on the updated stream, the same counter: the plain ops once more.
    GPTQ_EXPECT_OK(cuda::add_rms_norm_f16(dh_ref.get(), dfull.get(), dnw.get(), dx_ref.get(), pp, m, n_out, n_out,
                                          n_out, n_out, eps, nullptr));
    GPTQ_EXPECT_OK(
        cuda::int4_gemv_fused_f16(lay, dw, dsz, dx.get(), bp, dh_got.get(), m, n_in, n_out, f, nullptr, variant));
    compare(dh_got.download(), dh_ref.download(), n_out, "residual (second launch)");
    compare(dx_got.download(), dx_ref.download(), n_out, "output norm (second launch)");
}

// One random layer on the device, run for each m by the plain ops (add_rms_norm_f16 (+ its act-order
// permutation) then int4_gemv_f16 (then silu_mul_f16 over the interleaved rows); or int4_gemv_f16 then
// add_f16 into the residual stream) and by the fused kernel; the outputs must be the same bits.
// variant: -1 the table's choice, else a fused variant forced. Inputs: a residual stream of
// standard deviation 3 (norm weights around 1), strides that are odd for the norm's input.
void check_fused(std::mt19937& rng, uint32_t seed, fused_mode mode, int64_t n_out, int64_t n_in, int64_t gs, bool act,
                 bool sym, gptq_checkpoint_format fmt, const std::vector<int64_t>& ms, int variant) {
    layer L   = make_layer(rng, n_out, n_in, gs, 4, act, sym, fmt);
    auto  lay = cuda::int4_layout_for(n_out, n_in, gs);
    ASSERT_TRUE(lay.is_ok()) << lay.error().message();
    std::vector<int32_t> perm;
    GPTQ_EXPECT_OK(cuda::int4_act_order_perm(L.g_idx.data(), n_in, gs, perm));
    device_array<int32_t>  dq(L.qweight), dz(L.qzeros), dperm(perm);
    device_array<uint16_t> ds(L.scales);
    device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
    GPTQ_EXPECT_OK(cuda::int4_repack(*lay, dq.get(), dz.get(), ds.get(), perm.empty() ? nullptr : dperm.get(),
                                     fmt == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, dw.get(), dsz.get(),
                                     nullptr));
    const bool     norm          = mode == fused_mode::NORM || mode == fused_mode::NORM_SILU;
    const int32_t* dperm_or_null = perm.empty() ? nullptr : dperm.get();
    const float    eps           = 1e-5f;
    for (int64_t m : ms) {
        const std::string what = std::string(mode_name(mode)) + " " + describe(L, m, act, sym, seed) +
                                 " variant=" + (variant < 0 ? "auto" : cuda::int4_gemv_variant_name(variant));
        {  // rows that do not fit in shared memory (wide act-order layers at large m): refused, skipped
            cuda::int4_gemv_fusion probe;
            probe.norm_w   = norm ? reinterpret_cast<const uint16_t*>(uintptr_t(256)) : nullptr;  // not read
            probe.perm     = norm ? dperm_or_null : nullptr;
            probe.residual = mode == fused_mode::RES || mode == fused_mode::RES_NORM;
            probe.silu     = mode == fused_mode::NORM_SILU || mode == fused_mode::SILU;
            if (mode == fused_mode::RES_NORM)
                probe.out_norm_w = reinterpret_cast<const uint16_t*>(uintptr_t(256)), probe.x_out_stride = n_out;
            const status st = cuda::int4_gemv_fused_check(*lay, m, probe, variant);
            if (st.code() == status_code::STATUS_UNSUPPORTED &&
                st.message().find("shared memory") != std::string::npos) {
                std::printf("skipped (%s): %s\n", what.c_str(), st.message().c_str());
                continue;
            }
            GPTQ_EXPECT_OK(st);
        }
        std::vector<uint16_t>  bias = (m % 2) ? test::random_f16(rng, size_t(n_out)) : std::vector<uint16_t>{};
        device_array<uint16_t> db(bias);
        const uint16_t*        bp = bias.empty() ? nullptr : db.get();
        if (mode == fused_mode::SILU || mode == fused_mode::RES_NORM) {
            check_epilogue(rng, what, mode, *lay, dw.get(), dsz.get(), m, act, bp, variant);
            continue;
        }
        const int64_t         n_y = mode == fused_mode::NORM_SILU ? n_out / 2 : n_out;
        std::vector<uint16_t> want, got;
        if (norm) {
            const int64_t x_stride = n_in + (m % 3) * 5;  // odd strides: 2-byte aligned rows
            auto          h        = test::random_f16(rng, size_t(m * x_stride), 3.0f);
            auto          nw       = test::random_f16(rng, size_t(n_in), 0.3f);
            for (auto& v : nw) v = f32_to_f16(1.0f + f16_to_f32(v));
            device_array<uint16_t> dh(h), dnw(nw), dxn(size_t(m * n_in)), dfull(size_t(m * n_out));
            device_array<uint16_t> dref(size_t(m * n_y)), dgot(size_t(m * n_y));
            GPTQ_EXPECT_OK(cuda::add_rms_norm_f16(dh.get(), nullptr, dnw.get(), dxn.get(), dperm_or_null, m, n_in,
                                                  x_stride, n_in, n_in, eps, nullptr));
            GPTQ_EXPECT_OK(cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), dxn.get(), bp, dfull.get(), m, n_in, n_out,
                                               nullptr, 0, nullptr));
            if (mode == fused_mode::NORM_SILU) {
                GPTQ_EXPECT_OK(cuda::silu_mul_f16(dfull.get(), dfull.get() + 16, dref.get(), m, n_y, n_out, n_out, n_y,
                                                  nullptr, nullptr, 16));
                want = dref.download();
            } else {
                want = dfull.download();
            }
            cuda::int4_gemv_fusion f;
            f.norm_w = dnw.get(), f.eps = eps, f.perm = dperm_or_null, f.silu = mode == fused_mode::NORM_SILU;
            GPTQ_EXPECT_OK(cuda::int4_gemv_fused_f16(*lay, dw.get(), dsz.get(), dh.get(), bp, dgot.get(), m, x_stride,
                                                     n_y, f, nullptr, variant));
            got = dgot.download();
            // The fused kernel reads the stream and leaves it: the norm's input is unchanged.
            EXPECT_EQ(dh.download(), h) << what;
        } else {
            auto                   x = test::random_f16(rng, size_t(m * n_in));  // already in the layer's order
            auto                   h = test::random_f16(rng, size_t(m * n_out), 3.0f);
            device_array<uint16_t> dx(x), dy(size_t(m * n_out)), dref(h), dgot(h);
            GPTQ_EXPECT_OK(cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), dx.get(), bp, dy.get(), m, n_in, n_out,
                                               nullptr, 0, nullptr));
            GPTQ_EXPECT_OK(cuda::add_f16(dref.get(), dy.get(), m * n_out, nullptr));
            want = dref.download();
            cuda::int4_gemv_fusion f;
            f.residual = true;
            GPTQ_EXPECT_OK(cuda::int4_gemv_fused_f16(*lay, dw.get(), dsz.get(), dx.get(), bp, dgot.get(), m, n_in,
                                                     n_out, f, nullptr, variant));
            got = dgot.download();
        }
        ASSERT_EQ(got.size(), want.size()) << what;
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i)
            if (got[i] != want[i] && bad++ < 5)
                ADD_FAILURE() << what << ": element " << i << " (row " << i / size_t(n_y) << " col " << i % size_t(n_y)
                              << ") fused " << f16_to_f32(got[i]) << " plain " << f16_to_f32(want[i]);
        EXPECT_EQ(bad, 0) << what;
    }
}

// Awkward shapes: n_in not a multiple of 256 (352: 11 k steps, rows not padded in shared memory;
// 1376 and 2080: uneven k chunks and norm threads), odd group counts (352 / 32, 1376 / 32, 384 /
// 128), one group, act-order, n_out not a multiple of the tile (norm, residual), the 4096-wide
// Llama shape; m = 1..16, every fused variant and the table's choice. (A layer whose rows do not fit in
// shared memory at some m is refused there, and that m is skipped.)
TEST(CudaGptq, Int4GemvFusedMatchesPlainOps) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t n_out, n_in, gs;
        bool    act;
    };
    const std::vector<shape> shapes   = {{40, 256, 128, false},   {264, 352, 32, true},  {1000, 1376, 32, false},
                                         {96, 384, 128, true},    {72, 96, -1, false},   {520, 2080, 32, true},
                                         {1056, 4096, 128, true}, {4104, 128, 64, false}};
    std::vector<int>         variants = {-1};
    for (int v = 0; v < cuda::int4_gemv_variant_count(); ++v)
        if (cuda::int4_gemv_fused_variant(v)) variants.push_back(v);
    ASSERT_GE(variants.size(), 2u);
    const std::vector<int64_t> all_m  = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    const std::vector<int64_t> some_m = {1, 3, 8, 9, 16};
    int                        i      = 0;
    for (fused_mode mode :
         {fused_mode::NORM, fused_mode::NORM_SILU, fused_mode::RES, fused_mode::SILU, fused_mode::RES_NORM})
        for (const shape& s : shapes) {
            const bool    silu  = mode == fused_mode::NORM_SILU || mode == fused_mode::SILU;
            const int64_t n_out = silu ? (s.n_out + 31) / 32 * 32 : s.n_out;
            const auto    fmt = i % 2 ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
            const int     variant = variants[size_t(i) % variants.size()];
            check_fused(rng, seed, mode, n_out, s.n_in, s.gs, s.act, i % 3 == 0, fmt, i % 4 == 0 ? all_m : some_m,
                        variant);
            ++i;
        }
}

// What the fused kernel refuses (the caller then runs the plain ops): more than 16 tokens, residual
// with SiLU, SiLU on rows that are not whole 32-row tiles, a permutation without the norm, a
// variant without a fused kernel; and a norm whose rows do not fit in shared memory.
TEST(CudaGptq, Int4GemvFusedRefusals) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto lay = cuda::int4_layout_for(40, 256, 128);
    ASSERT_TRUE(lay.is_ok());
    const uint16_t*        nw = reinterpret_cast<const uint16_t*>(uintptr_t(256));  // never dereferenced
    cuda::int4_gemv_fusion norm, res, silu_res, perm_only;
    norm.norm_w       = nw;
    res.residual      = true;
    silu_res.residual = silu_res.silu = true;
    perm_only.perm                    = reinterpret_cast<const int32_t*>(uintptr_t(256));
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*lay, 1, norm).is_ok());
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*lay, 8, res).is_ok());
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*lay, 16, norm).is_ok());
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 17, norm).code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 0, res).code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, silu_res).code(), status_code::STATUS_UNSUPPORTED);
    cuda::int4_gemv_fusion silu = norm;
    silu.silu                   = true;
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, silu).code(), status_code::STATUS_UNSUPPORTED);  // 40 rows
    cuda::int4_gemv_fusion silu_alone;
    silu_alone.silu = true;
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, silu_alone).code(), status_code::STATUS_UNSUPPORTED);  // 40 rows
    auto lay64 = cuda::int4_layout_for(64, 256, 128);
    ASSERT_TRUE(lay64.is_ok());
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*lay64, 8, silu_alone).is_ok());
    cuda::int4_gemv_fusion res_norm = res, out_norm_alone;
    res_norm.out_norm_w = out_norm_alone.out_norm_w = nw;
    res_norm.x_out_stride = out_norm_alone.x_out_stride = 40;
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*lay, 16, res_norm).is_ok());
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, out_norm_alone).code(), status_code::STATUS_UNSUPPORTED);
    res_norm.x_out_stride = 39;  // narrower than the stream
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, res_norm).code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, perm_only).code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, res, 0).code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(cuda::int4_gemv_fused_check(*lay, 1, cuda::int4_gemv_fusion{}).code(), status_code::STATUS_UNSUPPORTED);
    auto wide = cuda::int4_layout_for(64, 16384, 128);  // 9 rows of 32 KB at m = 8 (inputs and the weights)
    ASSERT_TRUE(wide.is_ok());
    EXPECT_TRUE(cuda::int4_gemv_fused_check(*wide, 1, norm).is_ok());
    EXPECT_EQ(cuda::int4_gemv_fused_check(*wide, 8, norm).code(), status_code::STATUS_UNSUPPORTED);
}

// ---- the F32-output GEMV (int4_gemv_f32out: the quantized lm_head's logits) -------------------------

// One random layer on the device, for each m: the F32 GEMV (`variant`: -1 the table's fused choice,
// else a fused variant forced) on x already permuted into the layout's k order, against
// - int4_gemv_f16 (the automatic variant: a pipelined one) on the same input: every pipelined variant
//   sums a column in the same order and rounds that F32 value once, so the F32 outputs rounded to F16
//   on the host must be its bits;
// - the reference in double (exact weights), within the F32 summation bound: every product is exact
//   (F16 x small integer on tensor cores), then at most ~2 roundings per mma (2 mma per k32 step), 2
//   per group flush and per chunk end, the 16-chunk tree, the bias: each at most 2^-23 of the sum of
//   |terms| (S = |bias| + sum |x w|), so |got - ref| <= (4 k_steps + 2 n_groups + 64) 2^-23 S.
// Rows are strided (x padded with NaN, y with poison that must stay: nothing written past n_out).
void check_f32out(std::mt19937& rng, uint32_t seed, int64_t n_out, int64_t n_in, int64_t gs, bool act, bool sym,
                  gptq_checkpoint_format fmt, const std::vector<int64_t>& ms, int variant) {
    layer L   = make_layer(rng, n_out, n_in, gs, 4, act, sym, fmt);
    auto  lay = cuda::int4_layout_for(n_out, n_in, gs);
    ASSERT_TRUE(lay.is_ok()) << lay.error().message();
    std::vector<int32_t> perm;
    GPTQ_EXPECT_OK(cuda::int4_act_order_perm(L.g_idx.data(), n_in, gs, perm));
    device_array<int32_t>  dq(L.qweight), dz(L.qzeros), dperm(perm);
    device_array<uint16_t> ds(L.scales);
    device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
    GPTQ_EXPECT_OK(cuda::int4_repack(*lay, dq.get(), dz.get(), ds.get(), perm.empty() ? nullptr : dperm.get(),
                                     fmt == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, dw.get(), dsz.get(),
                                     nullptr));
    layer absL = L;  // |w| for the bound's sum of |terms|
    for (double& v : absL.w) v = std::fabs(v);
    const double k_unit = (4.0 * double(lay->k_steps) + 2.0 * double(lay->n_groups) + 64.0) * std::ldexp(1.0, -23);
    for (int64_t m : ms) {
        const std::string what = "f32out " + describe(L, m, act, sym, seed) +
                                 " variant=" + (variant < 0 ? "auto" : cuda::int4_gemv_variant_name(variant));
        GPTQ_EXPECT_OK(cuda::int4_gemv_f32out_check(*lay, m, variant));
        const auto            x        = test::random_f16(rng, size_t(m * n_in));
        std::vector<uint16_t> bias     = (m % 2) ? test::random_f16(rng, size_t(n_out)) : std::vector<uint16_t>{};
        const int64_t         x_stride = n_in + 8 * (m % 3), y_stride = n_out + 3 * (m % 3);
        std::vector<uint16_t> xs(size_t(m * x_stride), uint16_t(0xFFFF));  // padding: F16 NaN
        for (int64_t r = 0; r < m; ++r)
            std::copy(x.begin() + r * n_in, x.begin() + (r + 1) * n_in, xs.begin() + r * x_stride);
        device_array<uint16_t> dx(xs), dxp(size_t(m * x_stride)), db(bias), dy16(size_t(m * n_out));
        device_array<float>    dy32(size_t(m * y_stride));  // 0xFF bytes: NaN poison
        const uint16_t*        xin = dx.get();
        if (!perm.empty()) {
            GPTQ_EXPECT_OK(
                cuda::gptq_permute_cols_f16(dx.get(), dperm.get(), dxp.get(), m, n_in, x_stride, x_stride, nullptr));
            xin = dxp.get();
        }
        const uint16_t* bp = bias.empty() ? nullptr : db.get();
        GPTQ_EXPECT_OK(cuda::int4_gemv_f32out(*lay, dw.get(), dsz.get(), xin, bp, dy32.get(), m, x_stride, y_stride,
                                              nullptr, variant));
        GPTQ_EXPECT_OK(cuda::int4_gemv_f16(*lay, dw.get(), dsz.get(), xin, bp, dy16.get(), m, x_stride, n_out, nullptr,
                                           0, nullptr));
        const auto            y32 = dy32.download();
        const auto            y16 = dy16.download();
        const auto            ref = reference(L, x, m, bias);
        std::vector<uint16_t> ax(x), ab(bias);  // |x|, |bias|
        for (auto& v : ax) v &= 0x7FFF;
        for (auto& v : ab) v &= 0x7FFF;
        const auto sabs = reference(absL, ax, m, ab);
        int64_t    bad = 0, bits = 0, stray = 0;
        for (int64_t r = 0; r < m; ++r) {
            for (int64_t n = 0; n < n_out; ++n) {
                const float  g = y32[size_t(r * y_stride + n)];
                const double e = ref[size_t(r * n_out + n)], bound = k_unit * sabs[size_t(r * n_out + n)];
                if (!(std::fabs(double(g) - e) <= bound) && bad++ < 5)
                    ADD_FAILURE() << what << ": row " << r << " col " << n << " gpu " << g << " ref " << e << " bound "
                                  << bound;
                if (f32_to_f16(g) != y16[size_t(r * n_out + n)] && bits++ < 5)
                    ADD_FAILURE() << what << ": row " << r << " col " << n << " F32 " << g << " rounds to "
                                  << f16_to_f32(f32_to_f16(g)) << ", the F16 GEMV gave "
                                  << f16_to_f32(y16[size_t(r * n_out + n)]);
            }
            for (int64_t n = n_out; n < y_stride; ++n) stray += !std::isnan(y32[size_t(r * y_stride + n)]);
        }
        EXPECT_EQ(bad, 0) << what;
        EXPECT_EQ(bits, 0) << what << ": F32 output rounded is not the F16 GEMV's bits";
        EXPECT_EQ(stray, 0) << what << ": written past n_out";
    }
}

// Awkward shapes (n_out a multiple of 8 but not of 32: a partial last tile; one k step; 11 and 43
// k steps: uneven chunks; one group; act-order), group sizes -1/32/64/128, sym/asym, v1/v2, m = 1..16
// (both column-tile counts), every fused variant forced and the table's choice.
TEST(CudaGptq, Int4GemvF32OutMatchesReferenceAndF16Bits) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t n_out, n_in, gs;
        bool    act;
    };
    const std::vector<shape> shapes   = {{40, 256, 128, false},  {264, 352, 32, true},    {1000, 1376, 32, false},
                                         {96, 384, 128, true},   {8, 32, -1, false},      {72, 96, -1, false},
                                         {4104, 128, 64, false}, {1056, 4096, 128, true}, {360, 5504, 64, true}};
    std::vector<int>         variants = {-1};
    for (int v = 0; v < cuda::int4_gemv_variant_count(); ++v)
        if (cuda::int4_gemv_fused_variant(v)) variants.push_back(v);
    const std::vector<int64_t> all_m  = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    const std::vector<int64_t> some_m = {1, 3, 8, 9, 16};
    int                        i      = 0;
    for (const shape& s : shapes) {
        const auto fmt = i % 2 ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
        check_f32out(rng, seed, s.n_out, s.n_in, s.gs, s.act, i % 3 == 0, fmt, i % 3 == 0 ? all_m : some_m,
                     variants[size_t(i) % variants.size()]);
        ++i;
    }
}

// What the F32 GEMV refuses, before any launch: m outside [1, 16] (UNSUPPORTED: the caller takes
// another path), a variant without a fused kernel, x not 16-byte aligned or its stride not a multiple
// of 8, strides below the layer's widths.
TEST(CudaGptq, Int4GemvF32OutRefusals) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto lay = cuda::int4_layout_for(40, 256, 128);
    ASSERT_TRUE(lay.is_ok());
    EXPECT_TRUE(cuda::int4_gemv_f32out_check(*lay, 1).is_ok());
    EXPECT_TRUE(cuda::int4_gemv_f32out_check(*lay, 16).is_ok());
    EXPECT_EQ(cuda::int4_gemv_f32out_check(*lay, 0).code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_EQ(cuda::int4_gemv_f32out_check(*lay, 17).code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_EQ(cuda::int4_gemv_f32out_check(*lay, 1, 0).code(), status_code::STATUS_INVALID_ARGUMENT);
    device_array<uint16_t> x(size_t(2 * 264));
    device_array<float>    y(size_t(2 * 48));
    device_array<uint8_t>  dw(size_t(lay->weight_bytes)), dsz(size_t(lay->sz_bytes));
    auto                   run = [&](const uint16_t* xp, int64_t x_stride, int64_t y_stride) {
        return cuda::int4_gemv_f32out(*lay, dw.get(), dsz.get(), xp, nullptr, y.get(), 2, x_stride, y_stride, nullptr)
            .code();
    };
    EXPECT_EQ(run(x.get() + 1, 256, 40), status_code::STATUS_INVALID_ARGUMENT);  // 2-byte aligned
    EXPECT_EQ(run(x.get(), 258, 40), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(run(x.get(), 128, 40), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(run(x.get(), 256, 32), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace gptq
