// CUDA kernels (RMSNorm, RoPE, SiLU-mul, add, embedding, cuBLAS GEMM, attention prefill/decode)
// against the CPU reference kernels on fresh random F16 inputs, many shapes including awkward
// ones. Every input is an exact F16 value, so the reference sees the very numbers the GPU sees.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include <cublas_v2.h>

#include "cuda_test_util.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/norm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/kv_cache.cuh"
#include "kernels/cuda/logits_top.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "ops/logits_top.h"

namespace gptq {
namespace {

using test::device_array;

// One F16 rounding of the output is 2^-11 relative; F32 arithmetic in a different order (and
// __expf in attention) adds far less. Elementwise bound: rtol * |ref| + atol * scale, scale being
// the RMS of the reference, so values near zero after cancellation are judged on the row's scale.
constexpr float k_rtol_f16           = 1.0f / 1024;    // two F16 roundings
constexpr float k_atol_rel           = 1e-3f;          // of the reference RMS: F32 summation-order differences
constexpr float k_f16_subnormal_step = 5.9604645e-8f;  // 2^-24
// GEMM: F16/BF16 operands are exact, the products exact in F32 accumulation; cuBLAS may sum in
// another order or split k. Normwise relative error bounds.
constexpr double k_gemm_f16_rel  = 1e-3;  // output rounding 2^-11 plus summation order
constexpr double k_gemm_bf16_rel = 8e-3;  // output rounding 2^-8 plus summation order

double rms(const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return v.empty() ? 0.0 : std::sqrt(s / double(v.size()));
}

// Compare got (F16 bits) with ref (F32) on the listed indices.
void expect_close(const std::vector<uint16_t>& got, const std::vector<float>& ref, const char* what, uint32_t seed) {
    ASSERT_EQ(got.size(), ref.size());
    const double scale = rms(ref);
    int          bad   = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const float g = f16_to_f32(got[i]);
        // An F16 rounding is relative down to the smallest normal, then absolute: at most half the
        // subnormal spacing 2^-24 (a reference of 1e-13 comes out 0), twice for two roundings.
        const float tol = std::max(k_rtol_f16 * std::fabs(ref[i]), k_f16_subnormal_step) + float(k_atol_rel * scale);
        if (!(std::fabs(g - ref[i]) <= tol)) {
            if (bad++ < 5)
                ADD_FAILURE() << what << " seed " << seed << " index " << i << ": gpu " << g << " ref " << ref[i];
        }
    }
    EXPECT_EQ(bad, 0) << what << " seed " << seed;
}

TEST(CudaKernels, RmsNormMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, dim, pad] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 0}, {3, 7, 1}, {5, 4096, 0}, {2, 5120, 8}, {17, 129, 3}, {64, 2048, 0}}) {
        const int64_t          stride = dim + pad;
        auto                   x      = test::random_f16(rng, size_t(rows * stride), 2.0f);
        auto                   w      = test::random_f16(rng, size_t(dim));
        device_array<uint16_t> dx(x), dw(w), dy(size_t(rows * stride));
        GPTQ_EXPECT_OK(cuda::rms_norm_f16(dx.get(), dw.get(), dy.get(), rows, dim, stride, stride, 1e-5f, nullptr));
        const auto            y  = dy.download();
        const auto            xf = test::to_f32(x), wf = test::to_f32(w);
        std::vector<float>    ref(size_t(rows * dim)), xd(size_t(rows * dim));
        std::vector<uint16_t> got(static_cast<size_t>(rows * dim));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < dim; ++i) {
                xd[size_t(r * dim + i)]  = xf[size_t(r * stride + i)];
                got[size_t(r * dim + i)] = y[size_t(r * stride + i)];
            }
        cpu::rms_norm_ref(xd.data(), wf.data(), ref.data(), rows, dim, 1e-5f);
        expect_close(got, ref, "rms_norm", seed);
        // In place: the same values as out of place, and the padding past dim untouched.
        GPTQ_EXPECT_OK(cuda::rms_norm_f16(dx.get(), dw.get(), dx.get(), rows, dim, stride, stride, 1e-5f, nullptr));
        const auto inplace = dx.download();
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < stride; ++i)
                ASSERT_EQ(inplace[size_t(r * stride + i)],
                          i < dim ? y[size_t(r * stride + i)] : x[size_t(r * stride + i)])
                    << "row " << r << " col " << i;
    }
}

TEST(CudaKernels, RopeMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t                        seed = test::fresh_seed();
    std::mt19937                          rng(seed);
    std::uniform_real_distribution<float> ang(-3.2f, 3.2f);
    for (auto [tokens, heads, hd, extra] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
             {1, 1, 2, 0}, {7, 3, 64, 5}, {33, 32, 128, 0}, {5, 8, 80, 1024}, {2, 2, 256, 2}}) {
        const int64_t      half = hd / 2, stride = heads * hd + extra;
        auto               x = test::random_f16(rng, size_t(tokens * stride));
        std::vector<float> c(size_t(tokens * half)), s(c.size());
        for (size_t i = 0; i < c.size(); ++i) {
            const float a = ang(rng);
            c[i] = std::cos(a), s[i] = std::sin(a);
        }
        device_array<uint16_t> dx(x);
        device_array<float>    dc(c), ds(s);
        GPTQ_EXPECT_OK(cuda::rope_f16(dx.get(), dc.get(), ds.get(), tokens, heads, hd, stride, nullptr));
        auto ref = test::to_f32(x);
        cpu::rope_ref(ref.data(), c.data(), s.data(), tokens, heads, hd, stride);
        expect_close(dx.download(), ref, "rope", seed);  // the tail past the heads must be untouched too
    }
}

TEST(CudaKernels, SiluMulAndAddMatchCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 11008}, {17, 333}, {1, 100003}}) {
        // Fused [rows, 2 * cols] gate_up buffer, output in place over the gate half.
        auto                   gu = test::random_f16(rng, size_t(rows * 2 * cols), 3.0f);
        device_array<uint16_t> dgu(gu);
        GPTQ_EXPECT_OK(cuda::silu_mul_f16(dgu.get(), dgu.get() + cols, dgu.get(), rows, cols, 2 * cols, 2 * cols,
                                          2 * cols, nullptr));
        const auto            out = dgu.download();
        const auto            guf = test::to_f32(gu);
        std::vector<float>    ref(static_cast<size_t>(rows * cols));
        std::vector<uint16_t> got(ref.size());
        for (int64_t r = 0; r < rows; ++r) {
            cpu::silu_mul_ref(&guf[size_t(r * 2 * cols)], &guf[size_t(r * 2 * cols + cols)], &ref[size_t(r * cols)],
                              cols);
            for (int64_t i = 0; i < cols; ++i) got[size_t(r * cols + i)] = out[size_t(r * 2 * cols + i)];
        }
        expect_close(got, ref, "silu_mul", seed);

        const int64_t          n = rows * cols;
        auto                   a = test::random_f16(rng, size_t(n)), b = test::random_f16(rng, size_t(n));
        device_array<uint16_t> da(a), db(b);
        GPTQ_EXPECT_OK(cuda::add_f16(da.get(), db.get(), n, nullptr));
        std::vector<float> sum(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) sum[size_t(i)] = f16_to_f32(a[size_t(i)]) + f16_to_f32(b[size_t(i)]);
        expect_close(da.download(), sum, "add", seed);
    }
}

// A random permutation of 0 .. n-1 (act-order column orders).
std::vector<int32_t> random_perm(std::mt19937& rng, int64_t n) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), rng);
    return p;
}

// GeGLU (Gemma): gelu_tanh(gate) * up against the plain double reference of the CPU, unfused
// (separate buffers, strides wider than the row) and fused in place, awkward shapes; then the
// permuted output is the unpermuted one permuted, bit for bit.
TEST(CudaKernels, GeluTanhMulMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 11008}, {17, 333}, {1, 100003}, {5, 7}, {64, 129}}) {
        // Fused [rows, 2 * cols] gate_up buffer, output in place over the gate half.
        auto                   gu = test::random_f16(rng, size_t(rows * 2 * cols), 4.0f);
        device_array<uint16_t> dgu(gu);
        GPTQ_EXPECT_OK(cuda::gelu_tanh_mul_f16(dgu.get(), dgu.get() + cols, dgu.get(), rows, cols, 2 * cols, 2 * cols,
                                               2 * cols, nullptr));
        const auto            out = dgu.download();
        const auto            guf = test::to_f32(gu);
        std::vector<float>    ref(static_cast<size_t>(rows * cols));
        std::vector<uint16_t> got(ref.size());
        for (int64_t r = 0; r < rows; ++r) {
            cpu::gelu_tanh_mul_ref(&guf[size_t(r * 2 * cols)], &guf[size_t(r * 2 * cols + cols)],
                                   &ref[size_t(r * cols)], cols);
            for (int64_t i = 0; i < cols; ++i) got[size_t(r * cols + i)] = out[size_t(r * 2 * cols + i)];
        }
        expect_close(got, ref, "gelu_tanh_mul (fused, in place)", seed);

        // Separate gate and up with padded rows, output contiguous; then permuted.
        const int64_t gs = cols + 3, us = cols + 5;
        auto          g = test::random_f16(rng, size_t(rows * gs), 4.0f), u = test::random_f16(rng, size_t(rows * us));
        device_array<uint16_t> dg(g), du(u), dy(size_t(rows * cols)), dyp(size_t(rows * cols));
        GPTQ_EXPECT_OK(cuda::gelu_tanh_mul_f16(dg.get(), du.get(), dy.get(), rows, cols, gs, us, cols, nullptr));
        const auto gf = test::to_f32(g), uf = test::to_f32(u);
        for (int64_t r = 0; r < rows; ++r)
            cpu::gelu_tanh_mul_ref(&gf[size_t(r * gs)], &uf[size_t(r * us)], &ref[size_t(r * cols)], cols);
        const auto y = dy.download();
        expect_close(y, ref, "gelu_tanh_mul (strided)", seed);
        const auto            perm = random_perm(rng, cols);
        device_array<int32_t> dp(perm);
        GPTQ_EXPECT_OK(
            cuda::gelu_tanh_mul_f16(dg.get(), du.get(), dyp.get(), rows, cols, gs, us, cols, nullptr, dp.get()));
        const auto yp = dyp.download();
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < cols; ++i)
                ASSERT_EQ(yp[size_t(r * cols + i)], y[size_t(r * cols + perm[size_t(i)])])
                    << "permuted row " << r << " col " << i << " seed " << seed;
    }
}

// Final logit soft-capping (F32 in place) against the double reference: tanhf's error is a few ulp.
TEST(CudaKernels, SoftcapMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [n, cap] : std::vector<std::pair<int64_t, float>>{{1, 30.0f}, {1000, 0.5f}, {100003, 30.0f}}) {
        std::normal_distribution<float> nd(0.0f, 3.0f * cap);
        std::vector<float>              x(static_cast<size_t>(n));
        for (auto& v : x) v = nd(rng);
        device_array<float> dx(x);
        GPTQ_EXPECT_OK(cuda::softcap_f32(dx.get(), n, cap, nullptr));
        const auto got = dx.download();
        cpu::softcap_ref(x.data(), n, cap);
        for (int64_t i = 0; i < n; ++i)
            ASSERT_NEAR(got[size_t(i)], x[size_t(i)], 1e-6f * cap + 1e-6f * std::fabs(x[size_t(i)]))
                << "n " << n << " cap " << cap << " index " << i << " seed " << seed;
    }
    EXPECT_FALSE(cuda::softcap_f32(nullptr, 4, 0.0f, nullptr).is_ok());  // cap 0 is "off": never launched
}

// Candidates for sampling (ops/logits_top.h): ids and values equal to the reference's (the same
// order, ties by lower id, -0 and +0 equal), sums to double summation error; rows with many ties (the
// rounded values hold -0 and +0), -inf, a huge vocabulary.
TEST(CudaKernels, LogitsTopMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct shape {
        int64_t rows, n_vocab, k;
    };
    for (auto [rows, n_vocab, k] : std::vector<shape>{{1, 1, 1},
                                                      {3, 7, 7},
                                                      {2, 255, 64},
                                                      {5, 256, 256},
                                                      {4, 257, 200},
                                                      {64, 1000, 64},
                                                      {64, 32000, 64},
                                                      {3, 32000, 1},
                                                      {2, 151936, 256},
                                                      {130, 50257, 20}}) {
        for (int variant = 0; variant < 3; ++variant) {  // continuous, coarse grid (ties), grid with -inf
            std::normal_distribution<float> nd(0.0f, 3.0f);
            std::vector<float>              l(static_cast<size_t>(rows * n_vocab));
            for (auto& v : l) v = variant == 0 ? nd(rng) : std::round(nd(rng));
            if (variant == 2)  // a third of each row (never its first value: a row all -inf has no softmax)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t j = 1; j < n_vocab; j += 3) l[size_t(r * n_vocab + j)] = -INFINITY;
            std::vector<float> it(static_cast<size_t>(rows));
            for (auto& v : it) v = std::uniform_real_distribution<float>(0.3f, 3.0f)(rng);
            logits_top ref;
            logits_top_cpu(l.data(), rows, n_vocab, k, it.data(), &ref);
            device_array<float>   dl(l), dit(it), dvals(static_cast<size_t>(rows * k));
            device_array<int32_t> dids(static_cast<size_t>(rows * k));
            device_array<double>  dsums(static_cast<size_t>(rows * 2));
            GPTQ_EXPECT_OK(cuda::logits_top_f32(dl.get(), rows, n_vocab, k, dit.get(), dids.get(), dvals.get(),
                                                dsums.get(), nullptr));
            const auto ids  = dids.download();
            const auto vals = dvals.download();
            const auto sums = dsums.download();
            ASSERT_EQ(ids, ref.ids) << "rows " << rows << " vocab " << n_vocab << " k " << k << " variant " << variant
                                    << " seed " << seed;
            ASSERT_EQ(vals, ref.logits);
            // n_vocab positive terms summed in double in another order: within n_vocab * 2^-52 of the
            // sum (the recursive-summation bound); the device measured up to 1.2e-12 relative at 32000.
            const double sum_rel = double(n_vocab) * 0x1p-52;
            for (int64_t r = 0; r < rows; ++r) {
                EXPECT_NEAR(sums[size_t(2 * r)], ref.sum_exp[size_t(r)], sum_rel * ref.sum_exp[size_t(r)]);
                EXPECT_NEAR(sums[size_t(2 * r + 1)], ref.sum_exp_t[size_t(r)], sum_rel * ref.sum_exp_t[size_t(r)]);
            }
        }
    }
    EXPECT_FALSE(cuda::logits_top_f32(nullptr, 1, 10, 11, nullptr, nullptr, nullptr, nullptr, nullptr).is_ok());
    EXPECT_FALSE(cuda::logits_top_f32(nullptr, 1, 1000, 257, nullptr, nullptr, nullptr, nullptr, nullptr).is_ok());
}

TEST(CudaKernels, EmbeddingGathersRows) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [vocab, dim, pad] :
         std::vector<std::tuple<int64_t, int64_t, int64_t>>{{5, 3, 0}, {1000, 4096, 0}, {77, 129, 7}}) {
        auto                                   table = test::random_f16(rng, size_t(vocab * dim));
        std::vector<int32_t>                   ids;
        std::uniform_int_distribution<int32_t> pick(0, int32_t(vocab - 1));
        for (int i = 0; i < 37; ++i) ids.push_back(pick(rng));
        ids.push_back(-1);  // out of range: a zero row, no out-of-bounds read
        ids.push_back(int32_t(vocab));
        const int64_t          n = int64_t(ids.size()), stride = dim + pad;
        device_array<uint16_t> dt(table), dout(size_t(n * stride));
        device_array<int32_t>  did(ids);
        GPTQ_EXPECT_OK(cuda::embedding_f16(dt.get(), did.get(), dout.get(), n, vocab, dim, stride, nullptr));
        const auto out = dout.download();
        for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < dim; ++i) {
                const int32_t  id   = ids[size_t(t)];
                const uint16_t want = (id >= 0 && id < vocab) ? table[size_t(id * dim + i)] : uint16_t(0);
                ASSERT_EQ(out[size_t(t * stride + i)], want) << "token " << t << " dim " << i << " seed " << seed;
            }
        // Scaled (Gemma: sqrt(hidden)): the F32 product rounded once to F16, exactly.
        const float scale = std::sqrt(float(dim));
        GPTQ_EXPECT_OK(cuda::embedding_f16(dt.get(), did.get(), dout.get(), n, vocab, dim, stride, nullptr, scale));
        const auto outs = dout.download();
        for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < dim; ++i) {
                const int32_t  id = ids[size_t(t)];
                const uint16_t want =
                    (id >= 0 && id < vocab) ? f32_to_f16(f16_to_f32(table[size_t(id * dim + i)]) * scale) : uint16_t(0);
                ASSERT_EQ(outs[size_t(t * stride + i)], want)
                    << "scaled: token " << t << " dim " << i << " seed " << seed;
            }
    }
}

TEST(CudaKernels, CublasGemmMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    cublasHandle_t handle = nullptr;
    ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
    for (auto dtype : {cuda::gemm_dtype::f16, cuda::gemm_dtype::bf16}) {
        for (auto [m, n, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
                 {1, 1, 1}, {1, 4096, 4096}, {7, 333, 129}, {64, 256, 2048}, {130, 96, 11008 / 4}}) {
            const bool                      bf = dtype == cuda::gemm_dtype::bf16;
            std::normal_distribution<float> d(0.0f, 1.0f);
            std::vector<uint16_t>           x(size_t(m * k)), w(size_t(n * k));
            for (auto& v : x) v = bf ? f32_to_bf16(d(rng)) : f32_to_f16(d(rng));
            for (auto& v : w) v = bf ? f32_to_bf16(d(rng)) : f32_to_f16(d(rng));
            auto f32 = [&](const std::vector<uint16_t>& h) {
                std::vector<float> o(h.size());
                for (size_t i = 0; i < h.size(); ++i) o[i] = bf ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
                return o;
            };
            device_array<uint16_t> dx(x), dw(w), dy(size_t(m * n));
            GPTQ_EXPECT_OK(
                cuda::gemm(handle, dtype, dx.get(), dw.get(), dy.get(), m, n, k, k, k, n, 1.0f, 0.0f, nullptr));
            const auto         y  = f32(dy.download());
            const auto         xf = f32(x), wf = f32(w);
            std::vector<float> ref(static_cast<size_t>(m * n));
            cpu::linear_ref(xf.data(), wf.data(), nullptr, ref.data(), m, n, k);
            double num = 0, den = 0;
            for (size_t i = 0; i < ref.size(); ++i) {
                num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
                den += double(ref[i]) * ref[i];
            }
            const double rel = std::sqrt(num / (den > 0 ? den : 1));
            EXPECT_LE(rel, bf ? k_gemm_bf16_rel : k_gemm_f16_rel)
                << (bf ? "bf16" : "f16") << " m=" << m << " n=" << n << " k=" << k << " seed " << seed;
        }
    }
    cublasDestroy(handle);
}

struct attn_case {
    int64_t n_q, n_kv, q_pos0, n_head, n_head_kv, head_dim, window;
};

// The decode kernel with counters (each (query, head)'s last block merges the key chunks: one
// launch) gives the two-kernel output `want` bit for bit, twice in a row on the same counters (the
// first launch must leave them zero); p.out is overwritten.
void expect_one_launch_decode_same(const cuda::attention_params& p, const std::vector<uint16_t>& want, uint32_t seed) {
    const int64_t          ws = cuda::attention_decode_workspace_floats(p.n_q, p.n_kv, p.n_head, p.head_dim);
    device_array<float>    dws(static_cast<size_t>(ws));
    device_array<unsigned> counters(size_t(cuda::attention_decode_counters(p.n_q, p.n_head)));
    ASSERT_EQ(cudaMemset(counters.get(), 0, counters.size() * sizeof(unsigned)), cudaSuccess);
    for (int round = 0; round < 2; ++round) {
        ASSERT_EQ(cudaMemset(p.out, 0xFF, want.size() * 2), cudaSuccess);
        GPTQ_EXPECT_OK(cuda::attention_decode_f16(p, dws.get(), ws, nullptr, counters.get()));
        std::vector<uint16_t> got(want.size());
        ASSERT_EQ(cudaMemcpy(got.data(), p.out, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
        EXPECT_EQ(got, want) << "one-launch decode, round " << round << ": n_q=" << p.n_q << " n_kv=" << p.n_kv
                             << " heads=" << p.n_head << " d=" << p.head_dim << " seed " << seed;
    }
    std::vector<unsigned> left(counters.size());
    ASSERT_EQ(cudaMemcpy(left.data(), counters.get(), left.size() * sizeof(unsigned), cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_EQ(left, std::vector<unsigned>(left.size(), 0u)) << "counters not left zero";
    // Output columns through a permutation (the next linear's act-order order), with the combine
    // kernel and in one launch: column c of each row at out_col[c], the same bits.
    const int64_t        width = p.n_head * p.head_dim, rows = p.n_q;
    std::vector<int32_t> cols(static_cast<size_t>(width));
    std::iota(cols.begin(), cols.end(), 0);
    std::mt19937 rng(seed + 1);
    std::shuffle(cols.begin(), cols.end(), rng);
    device_array<int32_t>  dcols(cols);
    cuda::attention_params pc = p;
    pc.out_col                = dcols.get();
    for (unsigned* cnt : {static_cast<unsigned*>(nullptr), counters.get()}) {
        ASSERT_EQ(cudaMemset(p.out, 0xFF, want.size() * 2), cudaSuccess);
        GPTQ_EXPECT_OK(cuda::attention_decode_f16(pc, dws.get(), ws, nullptr, cnt));
        std::vector<uint16_t> got(want.size());
        ASSERT_EQ(cudaMemcpy(got.data(), p.out, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
        int bad = 0;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < width; ++c)
                if (got[size_t(r * p.out_stride + cols[size_t(c)])] != want[size_t(r * p.out_stride + c)]) ++bad;
        EXPECT_EQ(bad, 0) << "decode with out_col (" << (cnt ? "one launch" : "combine kernel") << "): n_q=" << p.n_q
                          << " seed " << seed;
    }
    EXPECT_FALSE(cuda::attention_prefill_f16(pc, nullptr).is_ok()) << "the prefill kernel takes no out_col";
}

void run_attention(const attn_case& c, bool decode, uint32_t seed, float softcap = 0.0f) {
    std::mt19937  rng(seed);
    const int64_t q_stride = c.n_head * c.head_dim + 2, kv_stride = c.n_head_kv * c.head_dim + 4,
                  out_stride = c.n_head * c.head_dim;
    auto q = test::random_f16(rng, size_t(c.n_q * q_stride)), k = test::random_f16(rng, size_t(c.n_kv * kv_stride)),
         v = test::random_f16(rng, size_t(c.n_kv * kv_stride));
    device_array<uint16_t> dq(q), dk(k), dv(v), dout(size_t(c.n_q * out_stride));
    cuda::attention_params p;
    p.q = dq.get(), p.k = dk.get(), p.v = dv.get(), p.out = dout.get();
    p.n_q = c.n_q, p.n_kv = c.n_kv, p.q_pos0 = c.q_pos0, p.n_head = c.n_head, p.n_head_kv = c.n_head_kv;
    p.head_dim = c.head_dim, p.window = c.window, p.scale = 1.0f / std::sqrt(float(c.head_dim));
    p.softcap  = softcap;
    p.q_stride = q_stride, p.kv_stride = kv_stride, p.out_stride = out_stride;
    std::vector<uint16_t> got;
    if (decode) {
        const int64_t       ws = cuda::attention_decode_workspace_floats(c.n_q, c.n_kv, c.n_head, c.head_dim);
        device_array<float> dws(static_cast<size_t>(ws));
        GPTQ_EXPECT_OK(cuda::attention_decode_f16(p, dws.get(), ws, nullptr));
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        got = dout.download();  // before the check below, which writes p.out again (permuted columns)
        expect_one_launch_decode_same(p, got, seed);
    } else {
        GPTQ_EXPECT_OK(cuda::attention_prefill_f16(p, nullptr));
        got = dout.download();
    }
    const auto           qf = test::to_f32(q), kf = test::to_f32(k), vf = test::to_f32(v);
    std::vector<float>   ref(static_cast<size_t>(c.n_q * out_stride));
    cpu::attention_shape s;
    s.n_q = c.n_q, s.n_kv = c.n_kv, s.q_pos0 = c.q_pos0, s.n_head = c.n_head, s.n_head_kv = c.n_head_kv;
    s.head_dim = c.head_dim, s.window = c.window, s.scale = p.scale, s.softcap = softcap;
    s.q_stride = q_stride, s.kv_stride = kv_stride, s.out_stride = out_stride;
    cpu::attention_ref(qf.data(), kf.data(), vf.data(), ref.data(), s);
    const std::string what = std::string(decode ? "decode" : "prefill") + " n_q=" + std::to_string(c.n_q) +
                             " n_kv=" + std::to_string(c.n_kv) + " d=" + std::to_string(c.head_dim) +
                             " window=" + std::to_string(c.window) + " softcap=" + std::to_string(softcap);
    expect_close(got, ref, what.c_str(), seed);
}

TEST(CudaKernels, AttentionPrefillMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    for (const attn_case& c : std::vector<attn_case>{{1, 1, 0, 1, 1, 2, 0},
                                                     {37, 37, 0, 4, 2, 64, 0},
                                                     {70, 100, 30, 8, 8, 128, 0},
                                                     {50, 50, 0, 4, 1, 256, 17},
                                                     {33, 200, 167, 6, 3, 80, 40},
                                                     {300, 300, 0, 2, 2, 128, 0},
                                                     {16, 16, 0, 3, 1, 96, 1},
                                                     // tensor-core kernel: head_dim 64/128, n_q >= 64
                                                     {64, 64, 0, 2, 2, 64, 0},
                                                     {200, 200, 0, 4, 2, 64, 0},
                                                     {130, 500, 370, 4, 1, 128, 50},
                                                     {65, 65, 0, 3, 3, 128, 7},
                                                     {1000, 1000, 0, 2, 1, 128, 0}})
        for (bool cuda_cores : {false, true}) {  // the dispatch's choice, then the CUDA-core kernel everywhere
            cuda::attention_prefill_force_cuda_cores(cuda_cores);
            run_attention(c, false, seed);
        }
    cuda::attention_prefill_force_cuda_cores(false);
}

TEST(CudaKernels, AttentionDecodeMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    for (const attn_case& c : std::vector<attn_case>{{1, 1, 0, 1, 1, 2, 0},
                                                     {1, 4097, 4096, 32, 8, 128, 0},
                                                     {5, 300, 295, 8, 2, 128, 0},
                                                     {3, 1000, 997, 4, 4, 80, 100},
                                                     {1, 65, 64, 2, 1, 256, 0},
                                                     {16, 500, 484, 4, 2, 64, 33}})
        run_attention(c, true, seed);
}

// ---- paged KV cache (kv_pages.cuh) ---------------------------------------------------------------

// Sequences of len[s] rows each, kept in a pool of pages: the pages drawn from a shuffled pool and
// handed out in alternation (sequence 0's first page, sequence 1's first, ..., then the second
// pages), so each page table is scattered, interleaved with the others and not monotonic. Every
// pool row that holds no sequence row is NaN: a kernel that reads a row through a wrong entry
// gives NaN. k_seq / v_seq: the same rows contiguous per sequence (the CPU reference's input).
struct paged_kv {
    int64_t                            page_size = 0, max_pages = 0, n_pages = 0, kv_dim = 0;
    std::vector<int32_t>               table;           // [n_seq][max_pages], -1: no page
    std::vector<uint16_t>              k_pool, v_pool;  // [n_pages * page_size][kv_dim]
    std::vector<std::vector<uint16_t>> k_seq, v_seq;    // [len[s]][kv_dim]
    int64_t                            row_of(int64_t s, int64_t r) const {
                                   return int64_t(table[size_t(s * max_pages + r / page_size)]) * page_size + r % page_size;
    }
};

paged_kv make_paged(std::mt19937& rng, const std::vector<int64_t>& len, int64_t page_size, int64_t max_pages,
                    int64_t kv_dim, int64_t spare_pages) {
    paged_kv      kv;
    const int64_t n_seq = int64_t(len.size());
    kv.page_size = page_size, kv.max_pages = max_pages, kv.kv_dim = kv_dim;
    int64_t need = 0;
    for (int64_t l : len) need += (l + page_size - 1) / page_size;
    kv.n_pages = need + spare_pages;
    std::vector<int32_t> order(size_t(kv.n_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    kv.table.assign(size_t(n_seq * max_pages), -1);
    size_t next = 0;
    for (int64_t j = 0; j < max_pages; ++j)
        for (int64_t s = 0; s < n_seq; ++s)
            if (j * page_size < len[size_t(s)]) kv.table[size_t(s * max_pages + j)] = order[next++];
    const uint16_t nan = 0x7e00;
    kv.k_pool.assign(size_t(kv.n_pages * page_size * kv_dim), nan);
    kv.v_pool = kv.k_pool;
    for (int64_t s = 0; s < n_seq; ++s) {
        kv.k_seq.push_back(test::random_f16(rng, size_t(len[size_t(s)] * kv_dim)));
        kv.v_seq.push_back(test::random_f16(rng, size_t(len[size_t(s)] * kv_dim)));
        for (int64_t r = 0; r < len[size_t(s)]; ++r) {
            const int64_t row = kv.row_of(s, r);
            std::copy_n(kv.k_seq.back().begin() + r * kv_dim, kv_dim, kv.k_pool.begin() + row * kv_dim);
            std::copy_n(kv.v_seq.back().begin() + r * kv_dim, kv_dim, kv.v_pool.begin() + row * kv_dim);
        }
    }
    return kv;
}

// Ragged paged decode (continuous batching): query i at position pos[i] of sequence seq[i], its
// keys and values through that sequence's page table, each against the CPU reference of that one
// query over the sequence's contiguous rows 0 .. pos[i]. Page sizes 1, 16, 64; positions at and
// across page boundaries, the last position of the context; sequences repeat; the bound n_kv (grid,
// workspace) is larger than most positions + 1; GQA, sliding windows, soft-capping.
TEST(CudaKernels, AttentionDecodePagedMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct paged_case {
        int64_t n_q, n_seq, n_ctx, page_size, n_head, n_head_kv, head_dim, window;
        float   softcap;
    };
    for (const paged_case& c : std::vector<paged_case>{{1, 1, 1, 1, 1, 1, 2, 0, 0.0f},
                                                       {5, 3, 300, 16, 8, 2, 128, 0, 0.0f},
                                                       {24, 24, 130, 16, 4, 1, 64, 0, 0.0f},
                                                       {40, 7, 200, 64, 4, 4, 80, 33, 0.0f},
                                                       {9, 4, 70, 1, 4, 2, 64, 0, 0.0f},
                                                       {6, 3, 129, 64, 2, 1, 128, 20, 0.0f},
                                                       {3, 2, 1000, 16, 2, 1, 256, 0, 30.0f},
                                                       {12, 5, 100, 16, 6, 3, 64, 7, 5.0f}}) {
        const int64_t        kv_dim = c.n_head_kv * c.head_dim, q_dim = c.n_head * c.head_dim, q_stride = q_dim + 2;
        const int64_t        max_pages = (c.n_ctx + c.page_size - 1) / c.page_size;
        std::vector<int32_t> pos(size_t(c.n_q)), seq(size_t(c.n_q));
        std::vector<int64_t> len(size_t(c.n_seq), 1);
        for (int64_t i = 0; i < c.n_q; ++i) {
            seq[size_t(i)]     = int32_t(i < c.n_seq ? i : rng() % uint32_t(c.n_seq));
            const int64_t kind = i % 4;  // the last position, a page's first / last row, anywhere
            int64_t       p    = kind == 0 ? c.n_ctx - 1 : int64_t(rng() % uint32_t(c.n_ctx));
            if (kind == 1) p = p / c.page_size * c.page_size;
            if (kind == 2) p = std::min(c.n_ctx - 1, p / c.page_size * c.page_size + c.page_size - 1);
            pos[size_t(i)]              = int32_t(p);
            len[size_t(seq[size_t(i)])] = std::max(len[size_t(seq[size_t(i)])], p + 1);
        }
        const paged_kv         kv = make_paged(rng, len, c.page_size, max_pages, kv_dim, 3);
        auto                   q  = test::random_f16(rng, size_t(c.n_q * q_stride));
        device_array<uint16_t> dq(q), dk(kv.k_pool), dv(kv.v_pool), dout(size_t(c.n_q * q_dim));
        device_array<int32_t>  dpos(pos), dseq(seq), dtab(kv.table);
        cuda::attention_params p;
        p.q = dq.get(), p.k = dk.get(), p.v = dv.get(), p.out = dout.get();
        p.n_q = c.n_q, p.n_kv = c.n_ctx, p.n_head = c.n_head, p.n_head_kv = c.n_head_kv, p.head_dim = c.head_dim;
        p.window = c.window, p.scale = 1.0f / std::sqrt(float(c.head_dim)), p.softcap = c.softcap;
        p.q_stride = q_stride, p.kv_stride = kv_dim, p.out_stride = q_dim;
        p.q_pos_dev = dpos.get(), p.q_seq_dev = dseq.get();
        p.kv_pages             = {dtab.get(), c.page_size, max_pages};
        const int64_t       ws = cuda::attention_decode_workspace_floats(c.n_q, c.n_ctx, c.n_head, c.head_dim);
        device_array<float> dws(static_cast<size_t>(ws));
        GPTQ_EXPECT_OK(cuda::attention_decode_f16(p, dws.get(), ws, nullptr));
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const auto got = dout.download();
        expect_one_launch_decode_same(p, got, seed);
        const auto         qf = test::to_f32(q);
        std::vector<float> ref(size_t(c.n_q * q_dim));
        for (int64_t i = 0; i < c.n_q; ++i) {
            cpu::attention_shape sh;
            sh.n_q = 1, sh.n_kv = pos[size_t(i)] + 1, sh.q_pos0 = pos[size_t(i)];
            sh.n_head = c.n_head, sh.n_head_kv = c.n_head_kv, sh.head_dim = c.head_dim, sh.window = c.window;
            sh.scale = p.scale, sh.softcap = c.softcap;
            sh.q_stride = q_stride, sh.kv_stride = kv_dim, sh.out_stride = q_dim;
            const auto kf = test::to_f32(kv.k_seq[size_t(seq[size_t(i)])]),
                       vf = test::to_f32(kv.v_seq[size_t(seq[size_t(i)])]);
            cpu::attention_ref(qf.data() + i * q_stride, kf.data(), vf.data(), ref.data() + i * q_dim, sh);
        }
        const std::string what = "paged decode n_q=" + std::to_string(c.n_q) + " seqs=" + std::to_string(c.n_seq) +
                                 " n_ctx=" + std::to_string(c.n_ctx) + " page=" + std::to_string(c.page_size) +
                                 " d=" + std::to_string(c.head_dim) + " window=" + std::to_string(c.window);
        expect_close(got, ref, what.c_str(), seed);
    }
    // The prefill kernel refuses device positions; per-query sequences need a page table.
    cuda::attention_params bad;
    bad.n_q = 1, bad.n_kv = 1, bad.n_head = bad.n_head_kv = 1, bad.head_dim = 2;
    bad.q_stride = bad.kv_stride = bad.out_stride = 2;
    const int32_t one                             = 0;
    bad.q_pos_dev                                 = &one;
    EXPECT_FALSE(cuda::attention_prefill_f16(bad, nullptr).is_ok());
    bad.q_seq_dev = &one;
    float        ws[8];
    const status st = cuda::attention_decode_f16(bad, ws, 8, nullptr);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("page table"), std::string::npos) << st.message();
    // A page size that is not a power of two, and a table too short for n_kv, are refused by name.
    bad.q_seq_dev = nullptr;
    bad.kv_pages  = {&one, 3, 1};
    EXPECT_NE(cuda::attention_decode_f16(bad, ws, 8, nullptr).message().find("power of two"), std::string::npos);
    bad.kv_pages = {&one, 4, 1};
    bad.n_kv     = 5;
    EXPECT_NE(cuda::attention_decode_f16(bad, ws, 8, nullptr).message().find("page table"), std::string::npos);
}

// One sequence's chunk after its cached rows (the runtime's prefill_seq): queries at n_past ..
// n_past + n_q - 1 over rows 0 .. n_past + n_q - 1 through the sequence's page table (the table row
// of sequence `which` of three), against the CPU reference over the contiguous rows. Both prefill
// kernels (tensor cores, CUDA cores) and the decode kernel that op_cuda_attention uses for <= 16
// queries; page sizes 1, 16, 64.
TEST(CudaKernels, AttentionPrefillPagedMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct prefill_case {
        int64_t n_q, n_past, page_size, n_head, n_head_kv, head_dim, window;
        float   softcap;
    };
    for (const prefill_case& c : std::vector<prefill_case>{{37, 0, 16, 4, 2, 64, 0, 0.0f},
                                                           {70, 30, 16, 8, 8, 128, 0, 0.0f},
                                                           {130, 370, 64, 4, 1, 128, 50, 0.0f},
                                                           {64, 17, 1, 2, 2, 64, 0, 0.0f},
                                                           {33, 167, 16, 6, 3, 80, 40, 0.0f},
                                                           {200, 0, 64, 4, 2, 64, 8, 5.0f},
                                                           {50, 14, 16, 4, 1, 256, 17, 0.0f},
                                                           {5, 295, 16, 8, 2, 128, 0, 0.0f},  // decode kernel
                                                           {16, 484, 64, 4, 2, 64, 33, 0.0f},
                                                           {1, 64, 64, 2, 1, 128, 0, 0.0f}}) {
        const int64_t kv_dim = c.n_head_kv * c.head_dim, q_dim = c.n_head * c.head_dim, n_kv = c.n_past + c.n_q;
        const int64_t max_pages = (n_kv + 2 * c.page_size - 1) / c.page_size;  // a spare entry in each row
        const std::vector<int64_t> len{n_kv / 2 + 1, n_kv, n_kv / 3 + 1};
        const paged_kv             kv    = make_paged(rng, len, c.page_size, max_pages, kv_dim, 2);
        const int64_t              which = 1;
        auto                       q     = test::random_f16(rng, size_t(c.n_q * q_dim));
        device_array<int32_t>      dtab(kv.table);
        device_array<uint16_t>     dq(q), dk(kv.k_pool), dv(kv.v_pool);
        cuda::attention_params     p;
        p.q = dq.get(), p.k = dk.get(), p.v = dv.get();
        p.n_q = c.n_q, p.n_kv = n_kv, p.q_pos0 = c.n_past, p.n_head = c.n_head, p.n_head_kv = c.n_head_kv;
        p.head_dim = c.head_dim, p.window = c.window, p.scale = 1.0f / std::sqrt(float(c.head_dim));
        p.softcap  = c.softcap;
        p.q_stride = p.out_stride = q_dim, p.kv_stride = kv_dim;
        p.kv_pages            = {dtab.get() + which * max_pages, c.page_size, max_pages};
        const auto         qf = test::to_f32(q), kf = test::to_f32(kv.k_seq[which]), vf = test::to_f32(kv.v_seq[which]);
        std::vector<float> ref(size_t(c.n_q * q_dim));
        cpu::attention_shape sh;
        sh.n_q = c.n_q, sh.n_kv = n_kv, sh.q_pos0 = c.n_past, sh.n_head = c.n_head, sh.n_head_kv = c.n_head_kv;
        sh.head_dim = c.head_dim, sh.window = c.window, sh.scale = p.scale, sh.softcap = c.softcap;
        sh.q_stride = sh.out_stride = q_dim, sh.kv_stride = kv_dim;
        cpu::attention_ref(qf.data(), kf.data(), vf.data(), ref.data(), sh);
        const std::string what = "paged prefill n_q=" + std::to_string(c.n_q) + " n_past=" + std::to_string(c.n_past) +
                                 " page=" + std::to_string(c.page_size) + " d=" + std::to_string(c.head_dim);
        for (int kernel = 0; kernel < 3; ++kernel) {  // dispatch's choice, CUDA cores, decode (n_q <= 16)
            if (kernel == 2 && c.n_q > 16) continue;
            device_array<uint16_t> dout(size_t(c.n_q * q_dim));
            p.out = dout.get();
            if (kernel == 2) {
                const int64_t       ws = cuda::attention_decode_workspace_floats(c.n_q, n_kv, c.n_head, c.head_dim);
                device_array<float> dws(static_cast<size_t>(ws));
                GPTQ_EXPECT_OK(cuda::attention_decode_f16(p, dws.get(), ws, nullptr));
                ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            } else {
                cuda::attention_prefill_force_cuda_cores(kernel == 1);
                GPTQ_EXPECT_OK(cuda::attention_prefill_f16(p, nullptr));
                cuda::attention_prefill_force_cuda_cores(false);
            }
            expect_close(dout.download(), ref, (what + " kernel " + std::to_string(kernel)).c_str(), seed);
        }
    }
}

// Gemma 2's attention logit soft-capping in the three kernels (CUDA-core prefill, tensor-core
// prefill, decode) against the CPU reference; a small cap (0.5) changes the softmax a lot, a large
// one (50) hardly: both must match.
TEST(CudaKernels, AttentionSoftcapMatchesCpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    for (float cap : {0.5f, 50.0f}) {
        for (const attn_case& c : std::vector<attn_case>{{37, 37, 0, 4, 2, 64, 0},
                                                         {33, 200, 167, 6, 3, 80, 40},
                                                         {200, 200, 0, 4, 2, 64, 8},
                                                         {130, 500, 370, 4, 1, 128, 50}})
            for (bool cuda_cores : {false, true}) {
                cuda::attention_prefill_force_cuda_cores(cuda_cores);
                run_attention(c, false, seed, cap);
            }
        cuda::attention_prefill_force_cuda_cores(false);
        for (const attn_case& c : std::vector<attn_case>{
                 {1, 65, 64, 2, 1, 256, 0}, {5, 300, 295, 8, 2, 128, 0}, {16, 500, 484, 4, 2, 64, 33}})
            run_attention(c, true, seed, cap);
    }
}

TEST(CudaKernels, AttentionRejectsBadShapes) {
    GPTQ_SKIP_WITHOUT_GPU();
    cuda::attention_params p;
    p.n_q = 4, p.n_kv = 3, p.n_head = 4, p.n_head_kv = 3, p.head_dim = 64;
    p.q_stride = p.out_stride = 256, p.kv_stride = 192;
    const status st = cuda::attention_prefill_f16(p, nullptr);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("n_head_kv"), std::string::npos) << st.message();
}

// ---- fused decode-step kernels: bit for bit the unfused kernels they replace -------------------

TEST(CudaKernels, AddRmsNormIsAddThenRmsNorm) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, dim] : std::vector<std::pair<int64_t, int64_t>>{
             {1, 1}, {3, 7}, {1, 4096}, {5, 5120}, {17, 129}, {64, 2048}, {2, 20001}}) {
        for (int variant = 0; variant < 4; ++variant) {
            const bool with_add = variant & 1, with_perm = variant & 2;
            auto h = test::random_f16(rng, size_t(rows * dim), 2.0f), a = test::random_f16(rng, size_t(rows * dim));
            auto w          = test::random_f16(rng, size_t(dim));
            const auto perm = random_perm(rng, dim);
            // Reference: the unfused kernels, then the permutation on the host.
            device_array<uint16_t> rh(h), ra(a), rw(w), ry(size_t(rows * dim));
            if (with_add) GPTQ_EXPECT_OK(cuda::add_f16(rh.get(), ra.get(), rows * dim, nullptr));
            GPTQ_EXPECT_OK(cuda::rms_norm_f16(rh.get(), rw.get(), ry.get(), rows, dim, dim, dim, 1e-5f, nullptr));
            const auto ref_h = rh.download(), ref_y0 = ry.download();
            auto       ref_y = ref_y0;
            if (with_perm)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t i = 0; i < dim; ++i)
                        ref_y[size_t(r * dim + i)] = ref_y0[size_t(r * dim + perm[size_t(i)])];
            device_array<uint16_t> dh(h), da(a), dw(w), dy(size_t(rows * dim));
            device_array<int32_t>  dp(perm);
            GPTQ_EXPECT_OK(cuda::add_rms_norm_f16(dh.get(), with_add ? da.get() : nullptr, dw.get(), dy.get(),
                                                  with_perm ? dp.get() : nullptr, rows, dim, dim, dim, dim, 1e-5f,
                                                  nullptr));
            const auto got_h = dh.download(), got_y = dy.download();
            ASSERT_EQ(got_h, ref_h) << "residual sum, rows " << rows << " dim " << dim << " seed " << seed;
            ASSERT_EQ(got_y, ref_y) << "norm output, rows " << rows << " dim " << dim << " add " << with_add << " perm "
                                    << with_perm << " seed " << seed;
        }
    }
}

TEST(CudaKernels, RopeKvStoreIsRopeThenKvStore) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t                        seed = test::fresh_seed();
    std::mt19937                          rng(seed);
    std::uniform_real_distribution<float> ang(-3.2f, 3.2f);
    struct rk_case {
        int64_t tokens, n_head, n_head_kv, hd, pos, n_ctx;
        bool    fused;  // q, k, v as slices of one [tokens, q_dim + 2 kv_dim] row, else separate + padding
    };
    for (const rk_case& c : std::vector<rk_case>{{1, 1, 1, 2, 0, 1, true},
                                                 {1, 32, 32, 128, 511, 4096, true},
                                                 {7, 8, 2, 64, 3, 16, false},
                                                 {40, 6, 3, 80, 0, 64, true},
                                                 {5, 4, 4, 256, 13, 16, false},  // rows 16, 17 past n_ctx: skipped
                                                 {3, 14, 2, 64, 100, 103, true}}) {
        const int64_t q_dim = c.n_head * c.hd, kv_dim = c.n_head_kv * c.hd, half = c.hd / 2;
        const int64_t q_stride = c.fused ? q_dim + 2 * kv_dim : q_dim + 3, kv_stride = c.fused ? q_stride : kv_dim + 5;
        auto          qbuf        = test::random_f16(rng, size_t(c.tokens * q_stride));
        auto          kbuf        = test::random_f16(rng, size_t(c.tokens * kv_stride)),
             vbuf                 = test::random_f16(rng, size_t(c.tokens * kv_stride));
        auto               cache0 = test::random_f16(rng, size_t(c.n_ctx * kv_dim));
        std::vector<float> cs(size_t(c.tokens * half)), sn(cs.size());
        for (size_t i = 0; i < cs.size(); ++i) {
            const float t = ang(rng);
            cs[i] = std::cos(t), sn[i] = std::sin(t);
        }
        std::vector<int32_t> pos(size_t(c.tokens));
        for (int64_t t = 0; t < c.tokens; ++t) pos[size_t(t)] = int32_t(c.pos + t);  // one sequence
        const std::vector<int32_t> pos0{int32_t(c.pos)};
        device_array<float>        dc(cs), ds(sn);
        device_array<int32_t>      dpos(pos), dpos0(pos0);
        auto run = [&](bool fused_kernel, std::vector<uint16_t>* q_out, std::vector<uint16_t>* k_out,
                       std::vector<uint16_t>* ck, std::vector<uint16_t>* cv) {
            device_array<uint16_t> dq(qbuf), dk(kbuf), dv(vbuf), dck(cache0), dcv(cache0);
            // fused layout: k and v live in the q buffer at offsets q_dim and q_dim + kv_dim
            uint16_t* kp = c.fused ? dq.get() + q_dim : dk.get();
            uint16_t* vp = c.fused ? dq.get() + q_dim + kv_dim : dv.get();
            if (fused_kernel) {
                GPTQ_EXPECT_OK(cuda::rope_kv_store_f16(dq.get(), kp, vp, q_stride, kv_stride, dc.get(), ds.get(),
                                                       c.tokens, c.n_head, c.n_head_kv, c.hd, dck.get(), dcv.get(),
                                                       dpos.get(), nullptr, cuda::kv_page_map{}, c.n_ctx, nullptr));
            } else {
                GPTQ_EXPECT_OK(
                    cuda::rope_f16(dq.get(), dc.get(), ds.get(), c.tokens, c.n_head, c.hd, q_stride, nullptr));
                GPTQ_EXPECT_OK(cuda::rope_f16(kp, dc.get(), ds.get(), c.tokens, c.n_head_kv, c.hd, kv_stride, nullptr));
                GPTQ_EXPECT_OK(cuda::kv_store_f16(kp, vp, kv_stride, dck.get(), dcv.get(), dpos0.get(), c.tokens,
                                                  kv_dim, c.n_ctx, nullptr));
            }
            *q_out = dq.download();
            *k_out = dk.download();
            *ck    = dck.download();
            *cv    = dcv.download();
        };
        std::vector<uint16_t> q_ref, k_ref, ck_ref, cv_ref, q_got, k_got, ck_got, cv_got;
        run(false, &q_ref, &k_ref, &ck_ref, &cv_ref);
        run(true, &q_got, &k_got, &ck_got, &cv_got);
        const std::string what =
            "tokens " + std::to_string(c.tokens) + " hd " + std::to_string(c.hd) + " seed " + std::to_string(seed);
        ASSERT_EQ(ck_got, ck_ref) << "k cache, " << what;
        ASSERT_EQ(cv_got, cv_ref) << "v cache, " << what;
        // q rotated in place (the unfused path also rotated k in place; the fused kernel leaves k as
        // it was, so compare the q heads, and for separate buffers k must be untouched).
        for (int64_t t = 0; t < c.tokens; ++t)
            for (int64_t i = 0; i < q_stride; ++i) {
                const size_t idx = size_t(t * q_stride + i);
                if (i < q_dim)
                    ASSERT_EQ(q_got[idx], q_ref[idx]) << "q, token " << t << " col " << i << ", " << what;
                else if (!c.fused)
                    ASSERT_EQ(q_got[idx], qbuf[idx]) << "q padding, " << what;
                else if (i >= q_dim + kv_dim)
                    ASSERT_EQ(q_got[idx], qbuf[idx]) << "v slice must be untouched, " << what;
            }
        if (!c.fused) ASSERT_EQ(k_got, kbuf) << "k must be untouched, " << what;
    }
}

// Paged (the runtime): token t's k and v into position pos[t] of sequence seq[t] through the page
// tables (scattered, interleaved, not monotonic; page sizes 1, 16, 64), against rope_f16 on q and
// k, then each token's row written on the host at the pool row its table gives. Positions at page
// boundaries; one past n_ctx and one whose page entry is -1 are not written; every other pool row
// keeps its bytes. Then the plain form (seq_dev nullptr, the table row of one sequence): a chunk of
// consecutive positions crossing pages.
TEST(CudaKernels, RopeKvStorePagedWritesEachTokensRow) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t                        seed = test::fresh_seed();
    std::mt19937                          rng(seed);
    std::uniform_real_distribution<float> ang(-3.2f, 3.2f);
    for (const int64_t page_size : {int64_t(1), int64_t(16), int64_t(64)}) {
        for (const bool ragged : {true, false}) {
            const int64_t        tokens = ragged ? 9 : 40, n_head = 6, n_head_kv = 2, hd = 64, n_ctx = 150, n_seq = 12;
            const int64_t        q_dim = n_head * hd, kv_dim = n_head_kv * hd, half = hd / 2;
            const int64_t        max_pages = (n_ctx + page_size - 1) / page_size;
            std::vector<int32_t> pos(static_cast<size_t>(tokens)), seq(static_cast<size_t>(tokens));
            std::vector<int64_t> len(static_cast<size_t>(n_seq), 1);
            const int64_t        start = ragged ? 0 : std::max<int64_t>(0, page_size * 2 - 3);  // crosses pages
            for (int64_t t = 0; t < tokens; ++t) {
                seq[size_t(t)] = ragged ? int32_t((t * 5 + 3) % n_seq) : 4;  // distinct, not in order
                int64_t p      = ragged ? int64_t(rng() % uint32_t(n_ctx)) : start + t;
                if (ragged && t == 0) p = n_ctx - 1;
                if (ragged && t == 2) p = p / page_size * page_size;  // a page's first row
                pos[size_t(t)] = int32_t(p);
            }
            if (ragged) pos[1] = int32_t(n_ctx);  // past the context: not written
            for (int64_t t = 0; t < tokens; ++t)
                if (pos[size_t(t)] < n_ctx)
                    len[size_t(seq[size_t(t)])] = std::max<int64_t>(len[size_t(seq[size_t(t)])], pos[size_t(t)] + 1);
            paged_kv kv = make_paged(rng, len, page_size, max_pages, kv_dim, 2);
            if (ragged) {  // token 3's page is not in its table: not written
                const int64_t s3 = seq[3], e = s3 * max_pages + pos[3] / page_size;
                kv.table[size_t(e)] = -1;
            }
            auto qbuf                = test::random_f16(rng, size_t(tokens * q_dim));
            auto kbuf                = test::random_f16(rng, size_t(tokens * kv_dim)),
                 vbuf                = test::random_f16(rng, size_t(tokens * kv_dim));
            auto               pool0 = test::random_f16(rng, kv.k_pool.size());
            std::vector<float> cs(size_t(tokens * half)), sn(cs.size());
            for (size_t i = 0; i < cs.size(); ++i) {
                const float a = ang(rng);
                cs[i] = std::cos(a), sn[i] = std::sin(a);
            }
            device_array<float>     dc(cs), ds(sn);
            device_array<int32_t>   dpos(pos), dseq(seq), dtab(kv.table);
            device_array<uint16_t>  q1(qbuf), k1(kbuf), v1(vbuf), ck(pool0), cv(pool0);
            const cuda::kv_page_map m{dtab.get() + (ragged ? 0 : 4 * max_pages), page_size, max_pages};
            GPTQ_EXPECT_OK(cuda::rope_kv_store_f16(q1.get(), k1.get(), v1.get(), q_dim, kv_dim, dc.get(), ds.get(),
                                                   tokens, n_head, n_head_kv, hd, ck.get(), cv.get(), dpos.get(),
                                                   ragged ? dseq.get() : nullptr, m, n_ctx, nullptr));
            // Reference: the unfused RoPE, then the rows placed on the host.
            device_array<uint16_t> q2(qbuf), k2(kbuf);
            GPTQ_EXPECT_OK(cuda::rope_f16(q2.get(), dc.get(), ds.get(), tokens, n_head, hd, q_dim, nullptr));
            GPTQ_EXPECT_OK(cuda::rope_f16(k2.get(), dc.get(), ds.get(), tokens, n_head_kv, hd, kv_dim, nullptr));
            const auto k_rot  = k2.download();
            auto       ck_ref = pool0, cv_ref = pool0;
            for (int64_t t = 0; t < tokens; ++t) {
                const int64_t s = seq[size_t(t)], r = pos[size_t(t)];
                if (r >= n_ctx || kv.table[size_t(s * max_pages + r / page_size)] < 0) continue;
                const int64_t row = kv.row_of(s, r);
                std::copy_n(k_rot.begin() + t * kv_dim, kv_dim, ck_ref.begin() + row * kv_dim);
                std::copy_n(vbuf.begin() + t * kv_dim, kv_dim, cv_ref.begin() + row * kv_dim);
            }
            const std::string what = std::string(ragged ? "ragged" : "plain") + " page " + std::to_string(page_size) +
                                     ", seed " + std::to_string(seed);
            EXPECT_EQ(q1.download(), q2.download()) << "q, " << what;
            EXPECT_EQ(ck.download(), ck_ref) << "k pool, " << what;
            EXPECT_EQ(cv.download(), cv_ref) << "v pool, " << what;
            EXPECT_EQ(k1.download(), kbuf) << "k must be untouched, " << what;
        }
    }
    // Per-token sequences without a table, and a bad page size, are refused by name.
    const int32_t zero = 0;
    status st = cuda::rope_kv_store_f16(nullptr, nullptr, nullptr, 2, 2, nullptr, nullptr, 1, 1, 1, 2, nullptr, nullptr,
                                        &zero, &zero, cuda::kv_page_map{}, 1, nullptr);
    EXPECT_NE(st.message().find("page table"), std::string::npos) << st.message();
    st = cuda::rope_kv_store_f16(nullptr, nullptr, nullptr, 2, 2, nullptr, nullptr, 1, 1, 1, 2, nullptr, nullptr, &zero,
                                 nullptr, cuda::kv_page_map{&zero, 6, 1}, 1, nullptr);
    EXPECT_NE(st.message().find("power of two"), std::string::npos) << st.message();
}

TEST(CudaKernels, SiluMulPermutedIsSiluMulThenPermute) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 11008}, {5, 333}, {16, 4096}}) {
        auto                   gu   = test::random_f16(rng, size_t(rows * 2 * cols), 3.0f);
        const auto             perm = random_perm(rng, cols);
        device_array<uint16_t> dgu(gu), ref(size_t(rows * cols)), got(size_t(rows * cols));
        device_array<int32_t>  dp(perm);
        GPTQ_EXPECT_OK(
            cuda::silu_mul_f16(dgu.get(), dgu.get() + cols, ref.get(), rows, cols, 2 * cols, 2 * cols, cols, nullptr));
        GPTQ_EXPECT_OK(cuda::silu_mul_f16(dgu.get(), dgu.get() + cols, got.get(), rows, cols, 2 * cols, 2 * cols, cols,
                                          nullptr, dp.get()));
        const auto r = ref.download(), g = got.download();
        for (int64_t row = 0; row < rows; ++row)
            for (int64_t i = 0; i < cols; ++i)
                ASSERT_EQ(g[size_t(row * cols + i)], r[size_t(row * cols + perm[size_t(i)])])
                    << "row " << row << " col " << i << " seed " << seed;
    }
}

// gate/up interleaved in blocks of B features (the fused decode layout): the same bits as the plain
// kernel on the de-interleaved rows, with and without a permutation, SiLU and GELU; a block that
// does not divide the features is refused.
TEST(CudaKernels, ActMulInterleavedIsActMulOfTheDeinterleavedRows) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    for (auto [rows, cols, B] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 16, 16}, {1, 11008, 16}, {5, 336, 16}, {3, 96, 32}, {8, 4096, 16}}) {
        auto                  gu = test::random_f16(rng, size_t(rows * 2 * cols), 3.0f);
        std::vector<uint16_t> plain(gu.size());  // gate | up per row
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < cols; ++i) {
                const int64_t c                        = (i / B) * 2 * B + i % B;
                plain[size_t(r * 2 * cols + i)]        = gu[size_t(r * 2 * cols + c)];
                plain[size_t(r * 2 * cols + cols + i)] = gu[size_t(r * 2 * cols + c + B)];
            }
        const auto             perm = random_perm(rng, cols);
        device_array<uint16_t> dgu(gu), dplain(plain), ref(size_t(rows * cols)), got(size_t(rows * cols));
        device_array<int32_t>  dp(perm);
        for (int gelu = 0; gelu < 2; ++gelu)
            for (const int32_t* p : {static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(dp.get())}) {
                auto run = gelu ? cuda::gelu_tanh_mul_f16 : cuda::silu_mul_f16;
                GPTQ_EXPECT_OK(run(dplain.get(), dplain.get() + cols, ref.get(), rows, cols, 2 * cols, 2 * cols, cols,
                                   nullptr, p, 0));
                GPTQ_EXPECT_OK(
                    run(dgu.get(), dgu.get() + B, got.get(), rows, cols, 2 * cols, 2 * cols, cols, nullptr, p, B));
                EXPECT_EQ(got.download(), ref.download()) << rows << " x " << cols << " block " << B << " gelu " << gelu
                                                          << " perm " << (p != nullptr) << " seed " << seed;
            }
    }
    device_array<uint16_t> buf(size_t(2 * 40));
    const status st = cuda::silu_mul_f16(buf.get(), buf.get() + 16, buf.get(), 1, 40, 80, 80, 40, nullptr, nullptr, 16);
    EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT) << st.message();
}

// RoPE and the KV-cache append inside the decode attention (attention_params::k_new) against
// rope_kv_store_f16 then the decode kernel: the same output and the same cache rows, bit for bit.
// Ragged paged decode (one query per sequence, its own new row) and several queries of one
// contiguous sequence (every row from q_pos0 on new: later queries see earlier new keys), GQA,
// head_dim 2 (half 1), 80, 128, windows, with the combine kernel and in one launch.
TEST(CudaKernels, AttentionDecodeWithRopeIsRopeKvStoreThenAttention) {
    GPTQ_SKIP_WITHOUT_GPU();
    const uint32_t seed = test::fresh_seed();
    std::mt19937   rng(seed);
    struct rope_case {
        int64_t n_q, n_ctx, page_size, n_head, n_head_kv, head_dim, window;
        bool    ragged;
    };
    for (const rope_case& c : std::vector<rope_case>{{1, 1, 1, 1, 1, 2, 0, true},
                                                     {4, 300, 16, 8, 2, 128, 0, true},
                                                     {7, 90, 1, 4, 4, 80, 17, true},
                                                     {1, 40, 0, 4, 2, 128, 0, false},
                                                     {5, 64, 0, 6, 3, 80, 0, false},
                                                     {16, 100, 0, 4, 1, 64, 9, false}}) {
        const int64_t        D = c.head_dim, half = D / 2, q_dim = c.n_head * D, kv_dim = c.n_head_kv * D;
        const int64_t        stride = q_dim + 2 * kv_dim;  // the fused q/k/v rows
        std::vector<int32_t> pos(size_t(c.n_q)), seq(size_t(c.n_q));
        std::vector<int64_t> len(size_t(c.ragged ? c.n_q : 1));
        const int64_t        q_pos0 = c.ragged ? 0 : c.n_ctx - c.n_q - int64_t(rng() % 8);
        for (int64_t i = 0; i < c.n_q; ++i) {
            seq[size_t(i)] = c.ragged ? int32_t(i) : 0;
            pos[size_t(i)] = c.ragged ? int32_t(rng() % uint32_t(c.n_ctx)) : int32_t(q_pos0 + i);
            if (c.ragged && i == 0) pos[0] = int32_t(c.n_ctx - 1);
            len[size_t(seq[size_t(i)])] = std::max<int64_t>(len[size_t(seq[size_t(i)])], pos[size_t(i)] + 1);
        }
        // The cache: paged (ragged) or contiguous rows of one sequence; every row random, the new
        // rows included (both paths overwrite them).
        paged_kv              kv;
        std::vector<uint16_t> kc, vc;
        if (c.ragged) {
            kv = make_paged(rng, len, c.page_size, (c.n_ctx + c.page_size - 1) / c.page_size, kv_dim, 2);
            kc = kv.k_pool, vc = kv.v_pool;
        } else {
            kc = test::random_f16(rng, size_t(c.n_ctx * kv_dim));
            vc = test::random_f16(rng, size_t(c.n_ctx * kv_dim));
        }
        const auto                            qkv = test::random_f16(rng, size_t(c.n_q * stride));
        std::vector<float>                    cs(size_t(c.n_q * half)), sn(cs.size());
        std::uniform_real_distribution<float> angle(-3.14159f, 3.14159f);
        for (size_t i = 0; i < cs.size(); ++i) {
            const float a = angle(rng);
            cs[i] = std::cos(a), sn[i] = std::sin(a);
        }
        device_array<uint16_t>  dqkv(qkv), dqkv_rot(qkv), kA(kc), vA(vc), kB(kc), vB(vc);
        device_array<uint16_t>  outA(size_t(c.n_q * q_dim)), outB(size_t(c.n_q * q_dim));
        device_array<float>     dc(cs), ds(sn);
        device_array<int32_t>   dpos(pos), dseq(seq), dtab(kv.table);
        const cuda::kv_page_map map =
            c.ragged ? cuda::kv_page_map{dtab.get(), c.page_size, kv.max_pages} : cuda::kv_page_map{};
        // A: RoPE + store, then the kernel on the rotated q and the cache.
        GPTQ_EXPECT_OK(cuda::rope_kv_store_f16(dqkv_rot.get(), dqkv_rot.get() + q_dim, dqkv_rot.get() + q_dim + kv_dim,
                                               stride, stride, dc.get(), ds.get(), c.n_q, c.n_head, c.n_head_kv, D,
                                               kA.get(), vA.get(), dpos.get(), c.ragged ? dseq.get() : nullptr, map,
                                               c.n_ctx, nullptr));
        cuda::attention_params p;
        p.n_q = c.n_q, p.n_kv = c.ragged ? c.n_ctx : q_pos0 + c.n_q, p.q_pos0 = q_pos0;
        p.n_head = c.n_head, p.n_head_kv = c.n_head_kv, p.head_dim = D, p.window = c.window;
        p.scale    = 1.0f / std::sqrt(float(D));
        p.q_stride = stride, p.kv_stride = kv_dim, p.out_stride = q_dim;
        p.kv_pages = map;
        if (c.ragged) p.q_pos_dev = dpos.get(), p.q_seq_dev = dseq.get();
        const int64_t          ws = cuda::attention_decode_workspace_floats(p.n_q, p.n_kv, p.n_head, D);
        device_array<float>    dws(static_cast<size_t>(ws));
        cuda::attention_params pa = p;
        pa.q = dqkv_rot.get(), pa.k = kA.get(), pa.v = vA.get(), pa.out = outA.get();
        GPTQ_EXPECT_OK(cuda::attention_decode_f16(pa, dws.get(), ws, nullptr));
        const auto want = outA.download(), want_k = kA.download(), want_v = vA.download();
        // B: the unrotated rows into the kernel, with the combine kernel and in one launch.
        device_array<unsigned> counters(size_t(cuda::attention_decode_counters(p.n_q, p.n_head)));
        ASSERT_EQ(cudaMemset(counters.get(), 0, counters.size() * sizeof(unsigned)), cudaSuccess);
        for (unsigned* cnt : {static_cast<unsigned*>(nullptr), counters.get()}) {
            kB.upload(kc), vB.upload(vc);
            cuda::attention_params pb = p;
            pb.q = dqkv.get(), pb.k = kB.get(), pb.v = vB.get(), pb.out = outB.get();
            pb.k_new = dqkv.get() + q_dim, pb.v_new = dqkv.get() + q_dim + kv_dim, pb.new_stride = stride;
            pb.rope_cos = dc.get(), pb.rope_sin = ds.get(), pb.n_ctx = c.n_ctx;
            GPTQ_EXPECT_OK(cuda::attention_decode_f16(pb, dws.get(), ws, nullptr, cnt));
            const std::string what = std::string(c.ragged ? "ragged" : "plain") + " n_q=" + std::to_string(c.n_q) +
                                     " d=" + std::to_string(D) + " window=" + std::to_string(c.window) +
                                     (cnt ? " one launch" : " combine kernel") + " seed " + std::to_string(seed);
            EXPECT_EQ(outB.download(), want) << what << ": output";
            EXPECT_EQ(kB.download(), want_k) << what << ": keys in the cache";
            EXPECT_EQ(vB.download(), want_v) << what << ": values in the cache";
        }
    }
}

}  // namespace
}  // namespace gptq
