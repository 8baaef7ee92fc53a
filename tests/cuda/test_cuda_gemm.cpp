// The int4 prefill paths (m > 16 tokens) against a plain dequantize-then-matmul reference in double
// on the CPU: the fused int4 GEMM (every tile of the dispatch table, split-K on and off; the
// warp-streamed tiles over every m bucket of 17..256), the
// dequantize kernel (bit for bit) and dequantize + cuBLAS, and op_cuda_gptq_linear's dispatch with
// act-order. Fresh random layers and activations each run (the seed is printed on failure); m from
// 17 to 4096, awkward n_out (8 x odd), k lengths with an odd number of k32 steps, group sizes
// -1/32/64/128, act-order, sym/asym, v1/v2 zeros.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <deque>
#include <string>
#include <tuple>

#include "cuda_test_util.h"
#include "gptq_test_layer.h"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/gptq_int4.cuh"
#include "kernels/cuda/gptq_int4_gemm.cuh"
#include "ops/ops_cuda.h"

namespace gptq {
namespace {

using test::device_array;
using test::gptq_layer;
using tile = cuda::int4_gemm_tile;

// The reference uses the weights rounded to F16 once (test::gptq_weights_f16), exactly the values
// both paths multiply, so what remains is:
// - the output's rounding to F16, at most 2^-11 relative, and for dequantize + cuBLAS with a bias a
//   second one (the bias is added to the F16 GEMM result): 2^-10 relative covers both;
// - F32 accumulation (tensor cores, cuBLAS), relative to the size of the partial sums, not of the
//   result: with cancellation this is an absolute error. Its worst case, about (K / 16) 2^-23 of the
//   partial sums' magnitude (one F32 rounding per 16-term mma), is 3e-5 x the RMS of y at K = 4096
//   for these random layers; 2e-4 x RMS(reference) leaves room for the split-K sums and K = 8192.
constexpr double k_rtol     = 1.0 / 1024;
constexpr double k_atol_rel = 2e-4;

// Compares y (device layout [m, y_stride]) with the reference; the columns past n_out must still
// hold the poison the output was filled with (0xFFFF): nothing is written outside the output.
// rounded_before_bias: the product without the bias, which the path may round to F16 before
// adding the bias (half an ulp of it more).
void expect_close(const std::vector<uint16_t>& got, int64_t y_stride, const std::vector<double>& ref, int64_t m,
                  int64_t n_out, const std::string& what, const std::vector<double>* rounded_before_bias = nullptr) {
    double ss = 0;
    for (double v : ref) ss += v * v;
    const double atol = k_atol_rel * std::sqrt(ss / double(ref.size()));
    int64_t      bad = 0, stray = 0;
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t n = 0; n < n_out; ++n) {
            const double g = f16_to_f32(got[size_t(r * y_stride + n)]), e = ref[size_t(r * n_out + n)];
            const double pre =
                rounded_before_bias ? std::ldexp(std::fabs((*rounded_before_bias)[size_t(r * n_out + n)]), -11) : 0.0;
            if (!(std::fabs(g - e) <= k_rtol * std::fabs(e) + atol + pre) && bad++ < 5)
                ADD_FAILURE() << what << ": row " << r << " col " << n << " gpu " << g << " ref " << e;
        }
        for (int64_t n = n_out; n < y_stride; ++n) stray += got[size_t(r * y_stride + n)] != 0xFFFFu;
    }
    EXPECT_EQ(bad, 0) << what;
    EXPECT_EQ(stray, 0) << what << ": written past n_out";
}

// A layer repacked into the int4 layout on the device (kernel level, as cuda_gptq_linear_load does).
struct packed {
    cuda::int4_layout     lay;
    std::vector<int32_t>  perm;
    device_array<uint8_t> w, sz;
    device_array<int32_t> dperm;
    packed(const gptq_layer& L)
        : lay(*cuda::int4_layout_for(L.n_out, L.n_in, L.group_size)),
          perm(make_perm(L)),
          w(size_t(lay.weight_bytes)),
          sz(size_t(lay.sz_bytes)),
          dperm(perm) {
        device_array<int32_t>  dq(L.qweight), dz(L.qzeros);
        device_array<uint16_t> ds(L.scales);
        EXPECT_TRUE(cuda::int4_repack(lay, dq.get(), dz.get(), ds.get(), perm.empty() ? nullptr : dperm.get(),
                                      L.format == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, w.get(), sz.get(),
                                      nullptr)
                        .is_ok());
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
    static std::vector<int32_t> make_perm(const gptq_layer& L) {
        std::vector<int32_t> p;
        EXPECT_TRUE(cuda::int4_act_order_perm(L.g_idx.data(), L.n_in, L.group_size, p).is_ok());
        return p;
    }
    // x permuted on the host into the layout's k order (x[:, perm[i]]), or x itself.
    std::vector<uint16_t> permute(const std::vector<uint16_t>& x, int64_t m, int64_t n_in) const {
        if (perm.empty()) return x;
        std::vector<uint16_t> xp(x.size());
        for (int64_t r = 0; r < m; ++r)
            for (int64_t i = 0; i < n_in; ++i) xp[size_t(r * n_in + i)] = x[size_t(r * n_in + perm[size_t(i)])];
        return xp;
    }
};

// Runs the fused GEMM with `plan` on x (host, [m, n_in], original k order) and returns y [m, y_stride].
// Runs it twice on one workspace: the second launch relies on the first having left the split-K
// counters zero, and must give the same bits (the split sums are added in a fixed order).
std::vector<uint16_t> run_gemm(const packed& P, const gptq_layer& L, const std::vector<uint16_t>& x, int64_t m,
                               const std::vector<uint16_t>& bias, int64_t y_stride, cuda::int4_gemm_plan plan) {
    const int64_t         ws_bytes = cuda::int4_gemm_workspace_bytes(P.lay, m, plan);
    device_array<uint8_t> ws(static_cast<size_t>(ws_bytes));
    if (ws_bytes) {
        EXPECT_EQ(cudaMemset(ws.get(), 0, size_t(ws_bytes)), cudaSuccess);
    }
    device_array<uint16_t> dx(P.permute(x, m, L.n_in)), db(bias), dy(size_t(m * y_stride));
    std::vector<uint16_t>  y[2];
    for (int rep = 0; rep < 2; ++rep) {
        EXPECT_EQ(cudaMemset(dy.get(), 0xFF, size_t(m * y_stride) * 2), cudaSuccess);
        const status st = cuda::int4_gemm_f16(P.lay, P.w.get(), P.sz.get(), dx.get(), bias.empty() ? nullptr : db.get(),
                                              dy.get(), m, L.n_in, y_stride, ws.get(), ws_bytes, nullptr, plan);
        EXPECT_TRUE(st.is_ok()) << st.message();
        y[rep] = dy.download();
    }
    EXPECT_TRUE(y[0] == y[1]) << "second launch on the same workspace differs (m=" << m << ")";
    return y[0];
}

struct gemm_case {
    int64_t              n_out, n_in, gs;
    bool                 act, sym;
    std::vector<int64_t> ms;
};

// Every m of the issue at least twice, every group size with and without act-order, sym and asym,
// awkward n_out (8 x odd: the last 32-row tile and the last block are partial), k with an odd
// number of k32 steps (160 = 5 steps, 416 = 13: the last 64-wide stage is half empty).
const std::vector<gemm_case> k_cases = {
    {72, 160, 32, false, true, {17, 31, 32, 33, 4096}},
    {264, 416, -1, true, false, {64, 100, 2048}},
    {1000, 384, 128, true, true, {128, 255, 1000}},
    {96, 1024, 64, false, false, {17, 256, 512}},
    {520, 2048, 128, false, true, {31, 33, 255, 256}},
    {136, 1024, 32, true, false, {32, 64, 512, 2048}},
    {2056, 512, 64, true, true, {100, 128}},
    {40, 3072, -1, false, false, {1000, 4096}},
};

TEST(CudaGemm, FusedMatchesReference) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    int            i = 0;
    for (const gemm_case& c : k_cases) {
        const auto fmt = (i++ % 2) ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
        gptq_layer L   = test::gptq_layer_random(rng, c.n_out, c.n_in, c.gs, 4, c.act, c.sym, fmt);
        packed     P(L);
        EXPECT_EQ(P.perm.empty(), !c.act || c.gs == -1);
        const auto w16 = test::gptq_weights_f16(L);
        for (int64_t m : c.ms) {
            auto                  x        = test::random_f16(rng, size_t(m * c.n_in));
            std::vector<uint16_t> bias     = (m % 2) ? test::random_f16(rng, size_t(c.n_out)) : std::vector<uint16_t>{};
            const int64_t         y_stride = c.n_out + 8 * (m % 3) + (m % 5 == 0);  // padded, sometimes odd
            const auto            ref      = test::gptq_reference(w16, c.n_out, c.n_in, x, m, bias);
            const auto            y        = run_gemm(P, L, x, m, bias, y_stride, {});
            const auto            plan     = cuda::int4_gemm_plan_for(m, c.n_in);
            expect_close(y, y_stride, ref, m, c.n_out,
                         test::gptq_layer_describe(L, m, c.act, c.sym, seed) + " tile=" +
                             cuda::int4_gemm_tile_name(plan.tile) + " splits=" + std::to_string(plan.splits));
            if (cuda::int4_gemm_has_wgmma()) {  // the wgmma tile of m's bucket as well, both x orders
                const tile wt[2][2] = {
                    {m <= 64 ? tile::INT4_GEMM_TILE_WG_M64_N256 : tile::INT4_GEMM_TILE_WG_M128_N256,
                     m <= 64 ? tile::INT4_GEMM_TILE_WG_M64_N256_XREG : tile::INT4_GEMM_TILE_WG_M128_N256_XREG},
                    {tile::INT4_GEMM_TILE_WG_M32_N128, tile::INT4_GEMM_TILE_WG_M128_N128}};
                for (const tile t : wt[m % 2]) {
                    const auto yw = run_gemm(P, L, x, m, bias, y_stride, {t, 0});
                    expect_close(
                        yw, y_stride, ref, m, c.n_out,
                        test::gptq_layer_describe(L, m, c.act, c.sym, seed) + " tile=" + cuda::int4_gemm_tile_name(t));
                }
            }
        }
    }
}

TEST(CudaGemm, EveryTileAndSplit) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    // k = 1056: 33 k32 steps, 17 stages, uneven over 3 splits; n_out = 8 x 35 (three partial blocks).
    gptq_layer L = test::gptq_layer_random(rng, 280, 1056, 32, 4, true, false, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    packed     P(L);
    const auto w16 = test::gptq_weights_f16(L);
    for (int64_t m : {17, 64, 100, 300}) {
        auto                        x    = test::random_f16(rng, size_t(m * L.n_in));
        const std::vector<uint16_t> bias = test::random_f16(rng, size_t(L.n_out));
        const auto                  ref  = test::gptq_reference(w16, L.n_out, L.n_in, x, m, bias);
        for (int ti = 1; ti < cuda::int4_gemm_tile_count; ++ti)
            for (int splits : {1, 2, 3, 8}) {
                const tile t = static_cast<tile>(ti);
                if (cuda::int4_gemm_tile_is_wgmma(t) && !cuda::int4_gemm_has_wgmma()) continue;  // not Hopper
                const auto y = run_gemm(P, L, x, m, bias, L.n_out, {t, splits});
                expect_close(y, L.n_out, ref, m, L.n_out,
                             test::gptq_layer_describe(L, m, true, false, seed) +
                                 " tile=" + cuda::int4_gemm_tile_name(t) + " splits=" + std::to_string(splits));
            }
    }
}

// The warp-streamed tiles (cuda::int4_gemm_tile_is_ws) over every m bucket of 17..256, awkward n_out
// (8 x odd; 8 alone: most warps past the last tile), k of 5 / 13 / 33 k32 steps (fewer than the ring,
// partial x chunks) and of several x chunks, group sizes -1/32/64/128, act-order, sym/asym, v1/v2,
// bias, padded and odd output strides; each tile with the table's splits and with a forced split.
TEST(CudaGemm, WarpStreamedMatchesReference) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t               seed = test::fresh_seed();
    std::mt19937                 rng(seed);
    const std::vector<gemm_case> cases = {
        {72, 160, 32, true, false, {17, 40, 64, 129}},    {8, 4096, 128, false, true, {33, 64, 100}},
        {264, 416, -1, true, false, {24, 65, 128, 256}},  {1000, 384, 128, true, true, {31, 63, 96, 200}},
        {136, 1056, 32, true, false, {17, 48, 127, 255}}, {520, 2048, 128, false, true, {32, 64, 128, 160}},
        {2056, 512, 64, true, true, {20, 80, 256}},       {40, 3072, -1, false, false, {56, 144}},
        {96, 11008, 32, false, false, {17, 64, 128}},
    };
    int i = 0, forced = 0;
    for (const gemm_case& c : cases) {
        const auto fmt = (i++ % 2) ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
        gptq_layer L   = test::gptq_layer_random(rng, c.n_out, c.n_in, c.gs, 4, c.act, c.sym, fmt);
        packed     P(L);
        const auto w16 = test::gptq_weights_f16(L);
        for (int64_t m : c.ms) {
            auto                  x        = test::random_f16(rng, size_t(m * c.n_in));
            std::vector<uint16_t> bias     = (m % 2) ? test::random_f16(rng, size_t(c.n_out)) : std::vector<uint16_t>{};
            const int64_t         y_stride = c.n_out + 8 * (m % 3) + (m % 5 == 0);  // padded, sometimes odd
            const auto            ref      = test::gptq_reference(w16, c.n_out, c.n_in, x, m, bias);
            for (int ti = 1; ti < cuda::int4_gemm_tile_count; ++ti) {
                const tile t = static_cast<tile>(ti);
                if (!cuda::int4_gemm_tile_is_ws(t)) continue;
                const int splits_forced = std::array<int, 4>{1, 2, 3, 8}[size_t(forced++ % 4)];
                for (int splits : {0, splits_forced}) {
                    const auto y    = run_gemm(P, L, x, m, bias, y_stride, {t, splits});
                    const auto plan = cuda::int4_gemm_plan_for(m, c.n_in, {t, splits});
                    expect_close(y, y_stride, ref, m, c.n_out,
                                 test::gptq_layer_describe(L, m, c.act, c.sym, seed) + " tile=" +
                                     cuda::int4_gemm_tile_name(t) + " splits=" + std::to_string(plan.splits));
                }
            }
        }
    }
}

// An output column's value does not depend on n_out (the table never looks at it), so a fused
// projection gives its parts' bits: rows [264, 528) of a 792-row layer vs those rows as a layer.
TEST(CudaGemm, ColumnsDoNotDependOnNOut) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (bool act : {false, true}) {
        gptq_layer L =
            test::gptq_layer_random(rng, 792, 2048, 128, 4, act, true, gptq_checkpoint_format::GPTQ_FORMAT_V1);
        gptq_layer R = test::gptq_layer_rows(L, 264, 528);
        packed     PL(L), PR(R);
        for (int64_t m : {17, 40, 64, 100, 256, 300}) {
            auto x = test::random_f16(rng, size_t(m * L.n_in));
            // The table's plan, and each warp-streamed tile with the table's splits for it.
            for (int ti = 0; ti < cuda::int4_gemm_tile_count; ++ti) {
                const tile t = static_cast<tile>(ti);
                if (ti != 0 && !cuda::int4_gemm_tile_is_ws(t)) continue;
                const auto yl   = run_gemm(PL, L, x, m, {}, L.n_out, {t, 0});
                const auto yr   = run_gemm(PR, R, x, m, {}, R.n_out, {t, 0});
                int64_t    diff = 0;
                for (int64_t r = 0; r < m; ++r)
                    for (int64_t n = 0; n < R.n_out; ++n)
                        diff += yl[size_t(r * L.n_out + 264 + n)] != yr[size_t(r * R.n_out + n)];
                EXPECT_EQ(diff, 0) << "m=" << m << " act=" << act << " tile=" << cuda::int4_gemm_tile_name(t)
                                   << " seed=" << seed;
            }
        }
    }
}

TEST(CudaGemm, DequantizeIsExactAndCublasMatchesReference) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    cublasHandle_t blas = nullptr;
    ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
    struct dq_case {
        int64_t n_out, n_in, gs;
        bool    act, sym;
        int64_t m;
    };
    // 160 and 416: k32 steps not a multiple of the kernel's 4 per item.
    for (const dq_case& c : std::vector<dq_case>{{72, 160, 32, true, false, 33},
                                                 {264, 416, -1, false, true, 100},
                                                 {1000, 1024, 128, true, true, 300},
                                                 {40, 2048, 64, false, false, 2048}}) {
        gptq_layer             L = test::gptq_layer_random(rng, c.n_out, c.n_in, c.gs, 4, c.act, c.sym,
                                                           gptq_checkpoint_format::GPTQ_FORMAT_V2);
        packed                 P(L);
        const int64_t          w_stride = c.n_in + 8;
        device_array<uint16_t> dw(size_t(c.n_out * w_stride));
        ASSERT_TRUE(cuda::int4_dequant_f16(P.lay, P.w.get(), P.sz.get(), dw.get(), w_stride, nullptr).is_ok());
        const auto w   = dw.download();
        int64_t    bad = 0;
        for (int64_t n = 0; n < c.n_out; ++n)
            for (int64_t i = 0; i < c.n_in; ++i) {
                const int64_t  k    = P.perm.empty() ? i : P.perm[size_t(i)];
                const uint16_t want = f32_to_f16(float(L.w[size_t(n * c.n_in + k)]));
                if (w[size_t(n * w_stride + i)] != want && bad++ < 5)
                    ADD_FAILURE() << "dequant n=" << n << " i=" << i << " got " << w[size_t(n * w_stride + i)]
                                  << " want " << want << " seed=" << seed;
            }
        EXPECT_EQ(bad, 0);
        // Dequantize + cuBLAS on the permuted x.
        auto                   x = test::random_f16(rng, size_t(c.m * c.n_in));
        device_array<uint16_t> dx(P.permute(x, c.m, c.n_in)), dy(size_t(c.m * c.n_out));
        ASSERT_TRUE(cuda::gemm(blas, cuda::gemm_dtype::f16, dx.get(), dw.get(), dy.get(), c.m, c.n_out, c.n_in, c.n_in,
                               w_stride, c.n_out, 1.0f, 0.0f, nullptr)
                        .is_ok());
        expect_close(dy.download(), c.n_out,
                     test::gptq_reference(test::gptq_weights_f16(L), c.n_out, c.n_in, x, c.m, {}), c.m, c.n_out,
                     test::gptq_layer_describe(L, c.m, c.act, c.sym, seed) + " dequant+cublas");
    }
    cublasDestroy(blas);
}

// op_cuda_gptq_linear: every prefill path through the dispatch (act-order: the op permutes x).
TEST(CudaGemm, OpPrefillPaths) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    auto           ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    for (bool act : {false, true}) {
        gptq_layer L =
            test::gptq_layer_random(rng, 264, 1024, 64, 4, act, false, gptq_checkpoint_format::GPTQ_FORMAT_V2);
        const auto        bias = test::random_f16(rng, size_t(L.n_out));
        gptq_host_tensors t;
        t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data(), t.g_idx = L.g_idx.data();
        t.bias = bias.data(), t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups, t.bits = 4;
        t.group_size = L.group_size, t.zero_add = 0;
        auto lin = cuda_gptq_linear_load(**ctx, t);
        ASSERT_TRUE(lin.is_ok()) << lin.error().message();
        ASSERT_TRUE(lin->fast);
        const auto w16 = test::gptq_weights_f16(L);
        for (int64_t m : {17, 64, 200, 600}) {
            auto                   x       = test::random_f16(rng, size_t(m * L.n_in));
            const auto             ref     = test::gptq_reference(w16, L.n_out, L.n_in, x, m, bias);
            const auto             product = test::gptq_reference(w16, L.n_out, L.n_in, x, m, {});
            device_array<uint16_t> dx(x), dy(size_t(m * L.n_out));
            // Dequantize + cuBLAS whole, then in row chunks (64: four whole ones and an 8-row
            // partial tile; 96: three tiles, the last one 72 rows).
            for (auto [path, chunk] : {std::pair{gptq_prefill_path::GPTQ_PREFILL_AUTO, 0},
                                       std::pair{gptq_prefill_path::GPTQ_PREFILL_FUSED, 0},
                                       std::pair{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 0},
                                       std::pair{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 64},
                                       std::pair{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 96}}) {
                lin->prefill            = path;
                lin->dequant_chunk_rows = chunk;
                ASSERT_EQ(cudaMemset(dy.get(), 0xFF, size_t(m * L.n_out) * 2), cudaSuccess);
                GPTQ_EXPECT_OK(op_cuda_gptq_linear(**ctx, *lin, dx.get(), dy.get(), m));
                GPTQ_EXPECT_OK((*ctx)->synchronize());
                // Dequantize + cuBLAS may round x W^T to F16 before the bias is added (ops_cuda.cpp,
                // dequant_cublas): half an ulp of the product more.
                const bool cublas =
                    path == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS ||
                    (path == gptq_prefill_path::GPTQ_PREFILL_AUTO &&
                     gptq_prefill_path_for(m, L.n_out, L.n_in) == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS);
                expect_close(dy.download(), L.n_out, ref, m, L.n_out,
                             test::gptq_layer_describe(L, m, act, false, seed) + " path=" + std::to_string(int(path)) +
                                 " chunk=" + std::to_string(chunk),
                             cublas ? &product : nullptr);
            }
        }
    }
}

// op_cuda_gptq_linear_f32_out (the quantized lm_head's logits, F32): every path against the reference
// in double: the F32 GEMV (m <= 16) and its 16-row chunks (the table's up to
// k_gptq_f32_out_gemv_max_m, forced above), within the GEMV's F32 summation bound with the exact
// weights, and its values rounded to F16 are op_cuda_gptq_linear's GEMV bits; dequantize + cuBLAS
// (the table's above k_gptq_f32_out_gemv_max_m, forced at m = 17) in row chunks (the default, 64
// and 96 rows: partial tiles and a short last chunk), within a sequential F32 sum's bound with the
// weights rounded to F16. Both with a bias and act-order (the op permutes x). The bounds are
// c 2^-23 S, S = |bias| + sum |x w| per output: an output rounded to F16 (2^-12 |y| off) fails them.
// A layer not on the int4 layout is refused (UNSUPPORTED: the model keeps a dense copy).
TEST(CudaGemm, OpF32OutPaths) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    auto           ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    struct f32_case {
        int64_t n_out, n_in, gs;
        bool    act, bias;
    };
    for (const f32_case& c : std::vector<f32_case>{
             {264, 1024, 64, false, true}, {1000, 384, 128, true, false}, {200, 256, -1, true, true}}) {
        gptq_layer        L    = test::gptq_layer_random(rng, c.n_out, c.n_in, c.gs, 4, c.act, false,
                                                         gptq_checkpoint_format::GPTQ_FORMAT_V2);
        const auto        bias = c.bias ? test::random_f16(rng, size_t(L.n_out)) : std::vector<uint16_t>{};
        gptq_host_tensors t;
        t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data(), t.g_idx = L.g_idx.data();
        t.bias = c.bias ? bias.data() : nullptr, t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups;
        t.bits = 4, t.group_size = L.group_size, t.zero_add = 0;
        auto lin = cuda_gptq_linear_load(**ctx, t);
        ASSERT_TRUE(lin.is_ok()) << lin.error().message();
        ASSERT_TRUE(lin->fast);
        EXPECT_EQ(lin->perm.bytes() != 0, c.act && c.gs != -1);
        const auto w16  = test::gptq_weights_f16(L);
        auto       absw = L.w, absw16 = w16;
        for (double& v : absw) v = std::fabs(v);
        for (double& v : absw16) v = std::fabs(v);
        std::vector<uint16_t> abias(bias);
        for (auto& v : abias) v &= 0x7FFF;
        const auto   lay    = *cuda::int4_layout_for(L.n_out, L.n_in, L.group_size);
        const double u      = std::ldexp(1.0, -23);
        const double c_gemv = (4.0 * double(lay.k_steps) + 2.0 * double(lay.n_groups) + 64.0) * u;
        const double c_blas = (double(L.n_in) + 64.0) * u;
        for (int64_t m : {1, 5, 16, 17, 40, 64, 65, 130}) {
            auto                  x = test::random_f16(rng, size_t(m * L.n_in));
            std::vector<uint16_t> ax(x);
            for (auto& v : ax) v &= 0x7FFF;
            const auto             ref   = test::gptq_reference(L.w, L.n_out, L.n_in, x, m, bias);
            const auto             s     = test::gptq_reference(absw, L.n_out, L.n_in, ax, m, abias);
            const auto             ref16 = test::gptq_reference(w16, L.n_out, L.n_in, x, m, bias);
            const auto             s16   = test::gptq_reference(absw16, L.n_out, L.n_in, ax, m, abias);
            device_array<uint16_t> dx(x), dy16(size_t(m * L.n_out));
            device_array<float>    dy(size_t(m * L.n_out));
            struct path_case {
                gptq_prefill_path path;
                int64_t           chunk;
            };
            for (const path_case& p : {path_case{gptq_prefill_path::GPTQ_PREFILL_AUTO, 0},
                                       path_case{gptq_prefill_path::GPTQ_PREFILL_GEMV, 0},
                                       path_case{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 0},
                                       path_case{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 64},
                                       path_case{gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS, 96}}) {
                const bool deq =
                    m > 16 && (p.path == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS ||
                               (p.path == gptq_prefill_path::GPTQ_PREFILL_AUTO && m > k_gptq_f32_out_gemv_max_m));
                if (m <= 16 && p.path == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS) continue;  // the GEMV
                lin->prefill            = p.path;
                lin->dequant_chunk_rows = p.chunk;
                ASSERT_EQ(cudaMemset(dy.get(), 0xFF, size_t(m * L.n_out) * 4), cudaSuccess);
                ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // before the context's non-blocking stream
                GPTQ_EXPECT_OK(op_cuda_gptq_linear_f32_out(**ctx, *lin, dx.get(), dy.get(), m));
                GPTQ_EXPECT_OK((*ctx)->synchronize());
                const auto        got  = dy.download();
                const std::string what = test::gptq_layer_describe(L, m, c.act, false, seed) +
                                         " bias=" + std::to_string(c.bias) + " path=" + std::to_string(int(p.path)) +
                                         " chunk=" + std::to_string(p.chunk) + (deq ? " (dequant+cublas)" : " (gemv)");
                const auto& e   = deq ? ref16 : ref;
                const auto& a   = deq ? s16 : s;
                int64_t     bad = 0;
                for (size_t i = 0; i < got.size(); ++i) {
                    const double bound = (deq ? c_blas : c_gemv) * a[i];
                    if (!(std::fabs(double(got[i]) - e[i]) <= bound) && bad++ < 5)
                        ADD_FAILURE() << what << ": row " << i / size_t(L.n_out) << " col " << i % size_t(L.n_out)
                                      << " gpu " << got[i] << " ref " << e[i] << " bound " << bound;
                }
                EXPECT_EQ(bad, 0) << what;
                if (deq) continue;
                // The GEMV path's bits: op_cuda_gptq_linear on its GEMV, rounded to F16 once.
                lin->prefill = gptq_prefill_path::GPTQ_PREFILL_GEMV;
                GPTQ_EXPECT_OK(op_cuda_gptq_linear(**ctx, *lin, dx.get(), dy16.get(), m));
                const auto y16  = dy16.download();
                int64_t    bits = 0;
                for (size_t i = 0; i < got.size(); ++i)
                    if (f32_to_f16(got[i]) != y16[i] && bits++ < 5)
                        ADD_FAILURE() << what << ": element " << i << " F32 " << got[i] << " F16 GEMV "
                                      << f16_to_f32(y16[i]);
                EXPECT_EQ(bits, 0) << what << ": F32 output rounded is not the F16 GEMV's bits";
            }
        }
    }
    // Not on the int4 layout (3 bits: the generic kernel): refused, nothing written.
    gptq_layer L3 = test::gptq_layer_random(rng, 64, 256, 128, 3, false, false, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    gptq_host_tensors t3;
    t3.qweight = L3.qweight.data(), t3.qzeros = L3.qzeros.data(), t3.scales = L3.scales.data();
    t3.g_idx = L3.g_idx.data(), t3.n_out = 64, t3.n_in = 256, t3.n_groups = L3.n_groups, t3.bits = 3;
    t3.group_size = 128;
    auto lin3     = cuda_gptq_linear_load(**ctx, t3);
    ASSERT_TRUE(lin3.is_ok()) << lin3.error().message();
    ASSERT_FALSE(lin3->fast);
    device_array<uint16_t> dx(size_t(2 * 256));
    device_array<float>    dy(size_t(2 * 64));
    EXPECT_EQ(op_cuda_gptq_linear_f32_out(**ctx, *lin3, dx.get(), dy.get(), 2).code(), status_code::STATUS_UNSUPPORTED);
}

// The dequantize-ahead slots (cuda_context::dequant_*): whatever order the linears are queued ahead
// and run in, including ahead work that is never taken, forgotten or queued twice, each output is
// the in-order one bit for bit.
TEST(CudaGemm, DequantAheadInAnyOrderGivesTheSameBits) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    auto           ctx = cuda_context::create(0);
    ASSERT_TRUE(ctx.is_ok()) << ctx.error().message();
    const int64_t                 m = 300;  // dequantize + cuBLAS
    std::vector<cuda_gptq_linear> lin;
    std::vector<gptq_layer>       layers;
    for (auto [n_out, n_in, act] :
         {std::tuple{264, 1024, false}, std::tuple{512, 384, true}, std::tuple{96, 2048, false}}) {
        layers.push_back(
            test::gptq_layer_random(rng, n_out, n_in, 64, 4, act, false, gptq_checkpoint_format::GPTQ_FORMAT_V2));
        const gptq_layer& L = layers.back();
        gptq_host_tensors t;
        t.qweight = L.qweight.data(), t.qzeros = L.qzeros.data(), t.scales = L.scales.data(), t.g_idx = L.g_idx.data();
        t.n_out = L.n_out, t.n_in = L.n_in, t.n_groups = L.n_groups, t.bits = 4, t.group_size = L.group_size;
        auto l = cuda_gptq_linear_load(**ctx, t);
        ASSERT_TRUE(l.is_ok()) << l.error().message();
        ASSERT_TRUE(l->fast);
        lin.push_back(std::move(*l));
    }
    std::deque<device_array<uint16_t>> dx, dy;  // not movable: built in place
    for (const auto& L : layers) {
        dx.emplace_back(test::random_f16(rng, size_t(m * L.n_in)));
        dy.emplace_back(size_t(m * L.n_out));
    }
    auto run = [&](size_t i) -> std::vector<uint16_t> {
        EXPECT_TRUE(op_cuda_gptq_linear(**ctx, lin[i], dx[i].get(), dy[i].get(), m).is_ok());
        EXPECT_TRUE((*ctx)->synchronize().is_ok());
        return dy[i].download();
    };
    std::vector<std::vector<uint16_t>> want;
    for (size_t i = 0; i < lin.size(); ++i) want.push_back(run(i));
    auto ahead = [&](size_t i) { GPTQ_EXPECT_OK(op_cuda_gptq_dequant_ahead(**ctx, lin[i], m)); };
    auto check = [&](size_t i, const char* what) {
        EXPECT_TRUE(run(i) == want[i]) << what << ": linear " << i << " seed=" << seed;
    };
    ahead(1), check(0, "ahead 1, run 0"), check(1, "then 1"), ahead(2), check(2, "ahead 2, run 2");
    ahead(1), ahead(2), check(2, "ahead 1 and 2, run 2 first"), check(1, "then 1"), check(0, "then 0");
    ahead(0), ahead(0), check(0, "ahead 0 twice");
    ahead(2), op_cuda_dequant_forget(**ctx), check(2, "ahead 2, forgotten");
    ahead(0), ahead(1), ahead(2), check(2, "three ahead, two slots"), check(0, "then 0"), check(1, "then 1");
    // No synchronisation between the launches: the events alone order the two streams.
    for (int rep = 0; rep < 3; ++rep) {
        for (size_t i = 0; i < lin.size(); ++i) {
            ahead((i + 1) % lin.size());
            GPTQ_EXPECT_OK(op_cuda_gptq_linear(**ctx, lin[i], dx[i].get(), dy[i].get(), m));
        }
    }
    GPTQ_EXPECT_OK((*ctx)->synchronize());
    for (size_t i = 0; i < lin.size(); ++i) EXPECT_TRUE(dy[i].download() == want[i]) << "pipelined, linear " << i;
}

// The contract between int4_repack and the GEMM: slot j (nibbles j, j + 4) of lane l's word i of
// (tile, step s) holds the codes of row 8 i + l / 4 at k = 32 s + slot_k + (0, 1), slot_k as
// int4_layout_k_grouped says.
TEST(CudaGemm, RepackedWordsFollowTheKOrder) {
    GPTQ_SKIP_WITHOUT_GPU();
    std::mt19937 rng(7);
    gptq_layer   L = test::gptq_layer_random(rng, 40, 96, 32, 4, false, true, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    packed       P(L);
    const auto   words = P.w.download();
    int64_t      bad   = 0;
    for (int64_t tile = 0; tile < P.lay.n_tiles; ++tile)
        for (int64_t s = 0; s < P.lay.k_steps; ++s)
            for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < 4; ++i) {
                    uint32_t word;
                    std::memcpy(&word, words.data() + ((tile * P.lay.k_steps + s) * 32 + lane) * 16 + i * 4, 4);
                    const int64_t n = tile * 32 + 8 * i + lane / 4;
                    for (int j = 0; j < 4; ++j)
                        for (int e = 0; e < 2; ++e) {
                            const int t = lane % 4;
                            const int sk =
                                cuda::int4_layout_k_grouped ? 8 * t + 2 * j : 16 * (j / 2) + 8 * (j % 2) + 2 * t;
                            const int64_t k    = 32 * s + sk + e;
                            const int     want = n < L.n_out ? L.codes[size_t(n * L.n_in + k)] : 0;
                            bad += int((word >> (4 * (j + 4 * e))) & 0xFu) != want;
                        }
                }
    EXPECT_EQ(bad, 0) << "int4_repack's in-step k order is not int4_layout_k_grouped = " << cuda::int4_layout_k_grouped;
}

TEST(CudaGemm, PlanTableAndErrors) {
    // The table: tile by m bucket, splits 1..8 from m and n_in only.
    if (cuda::int4_gemm_ws_in_table()) {  // GPTQ_INT4_WS_TABLE=1
        EXPECT_EQ(cuda::int4_gemm_plan_for(17, 4096).tile, tile::INT4_GEMM_TILE_WS_M32_N256);
        EXPECT_EQ(cuda::int4_gemm_plan_for(64, 4096).tile, tile::INT4_GEMM_TILE_WS_M64_N256);
        EXPECT_EQ(cuda::int4_gemm_plan_for(256, 4096).tile, tile::INT4_GEMM_TILE_WS_M128_N256);
        EXPECT_EQ(gptq_prefill_path_for(256, 4096, 4096), gptq_prefill_path::GPTQ_PREFILL_FUSED);
    } else if (cuda::int4_gemm_wgmma_in_table()) {  // GPTQ_INT4_WGMMA_TABLE=1 on Hopper with sm_90a code
        EXPECT_EQ(cuda::int4_gemm_plan_for(17, 4096).tile, tile::INT4_GEMM_TILE_WG_M32_N128);
        EXPECT_EQ(cuda::int4_gemm_plan_for(64, 4096).tile, tile::INT4_GEMM_TILE_WG_M64_N256);
        EXPECT_EQ(cuda::int4_gemm_plan_for(4096, 4096).tile, tile::INT4_GEMM_TILE_WG_M128_N256);
    } else {
        EXPECT_EQ(cuda::int4_gemm_plan_for(17, 4096).tile, tile::INT4_GEMM_TILE_M32_N128);
        EXPECT_EQ(cuda::int4_gemm_plan_for(128, 4096).tile, tile::INT4_GEMM_TILE_M32_N128);
        EXPECT_EQ(cuda::int4_gemm_plan_for(4096, 4096).tile, tile::INT4_GEMM_TILE_M128_N256);
    }
    EXPECT_EQ(cuda::int4_gemm_plan_for(64, 4096, {tile::INT4_GEMM_TILE_M64_N128, 3}).splits, 3);
    for (int64_t m : {17, 64, 65, 256, 257, 2048})
        for (int64_t k : {256, 4096, 11008, 28672})
            for (int ti = 0; ti < cuda::int4_gemm_tile_count; ++ti) {
                const auto p = cuda::int4_gemm_plan_for(m, k, {static_cast<tile>(ti), 0});
                EXPECT_GE(p.splits, 1);
                EXPECT_LE(p.splits, 8);
            }
    for (int ti = 1; ti < cuda::int4_gemm_tile_count; ++ti)  // every tile has a name of its own
        EXPECT_STRNE(cuda::int4_gemm_tile_name(static_cast<tile>(ti)), "?");
    EXPECT_FALSE(cuda::int4_gemm_tile_is_wgmma(tile::INT4_GEMM_TILE_WS_M64_N256));
    EXPECT_TRUE(cuda::int4_gemm_tile_is_ws(tile::INT4_GEMM_TILE_WS_M64_N256));
    EXPECT_FALSE(cuda::int4_gemm_tile_is_ws(tile::INT4_GEMM_TILE_WG_M128_N256_XREG));
    EXPECT_EQ(gptq_prefill_path_for(16, 4096, 4096), gptq_prefill_path::GPTQ_PREFILL_GEMV);
    GPTQ_SKIP_WITHOUT_GPU();
    auto lay = cuda::int4_layout_for(64, 256, 128);
    ASSERT_TRUE(lay.is_ok());
    device_array<uint16_t> x(size_t(40 * 264)), y(size_t(40 * 64));
    // x not 16-byte aligned, stride not a multiple of 8, workspace too small, splits out of range.
    EXPECT_FALSE(
        cuda::int4_gemm_f16(*lay, x.get(), x.get(), x.get() + 1, nullptr, y.get(), 40, 256, 64, nullptr, 0, nullptr)
            .is_ok());
    EXPECT_FALSE(
        cuda::int4_gemm_f16(*lay, x.get(), x.get(), x.get(), nullptr, y.get(), 40, 260, 64, nullptr, 0, nullptr)
            .is_ok());
    EXPECT_FALSE(cuda::int4_gemm_f16(*lay, x.get(), x.get(), x.get(), nullptr, y.get(), 40, 256, 64, nullptr, 0,
                                     nullptr, {tile::INT4_GEMM_TILE_M32_N128, 2})
                     .is_ok());
    EXPECT_FALSE(cuda::int4_gemm_f16(*lay, x.get(), x.get(), x.get(), nullptr, y.get(), 40, 256, 64, nullptr, 0,
                                     nullptr, {tile::INT4_GEMM_TILE_M32_N128, 9})
                     .is_ok());
}

}  // namespace
}  // namespace gptq
