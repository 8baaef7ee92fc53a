// kernels/cpu/linalg: BLAS/LAPACK versions against the plain references on random inputs over
// many shapes, including 1, odd sizes and sizes past BLAS block boundaries.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/cpu/linalg.h"
#include "kernels/cpu/linear.h"

using namespace gptq;

namespace {

// F32 sums of up to a few hundred products: relative error well under 1e-4 of the magnitude.
constexpr double k_tol_gemm = 1e-4;
// Cholesky-inverse of matrices with condition number <~ 1e3 in F32 (LAPACK) vs double (reference).
constexpr double k_tol_chol = 2e-3;

std::vector<float> randn(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> d;
    std::vector<float>              v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double scale = 1e-30, diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
        diff  = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    }
    return diff / scale;
}

// A random SPD matrix: X^T X / n + 0.1 I with n > k.
std::vector<float> random_spd(int64_t k, std::mt19937& rng) {
    const int64_t      n = 2 * k + 3;
    auto               x = randn(static_cast<size_t>(n * k), rng);
    std::vector<float> h(static_cast<size_t>(k * k), 0.0f);
    cpu::gram_accumulate_upper_ref(x.data(), n, k, 1.0f / static_cast<float>(n), h.data());
    cpu::symmetrize_from_upper(h.data(), k);
    for (int64_t i = 0; i < k; ++i) h[static_cast<size_t>(i * k + i)] += 0.1f;
    return h;
}

}  // namespace

TEST(linalg, gram_accumulate_matches_reference) {
    cpu::blas_init_single_threaded();
    std::mt19937 rng(11);
    for (auto [n, k] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 7}, {17, 33}, {130, 65}, {5, 257}}) {
        auto x   = randn(static_cast<size_t>(n * k), rng);
        auto ref = randn(static_cast<size_t>(k * k), rng);  // non-zero start: accumulation
        auto got = ref, got_pool = ref;
        cpu::gram_accumulate_upper_ref(x.data(), n, k, 0.5f, ref.data());
        cpu::gram_accumulate_upper(x.data(), n, k, 0.5f, got.data());
        thread_pool pool(3);
        cpu::gram_accumulate_upper(x.data(), n, k, 0.5f, got_pool.data(), &pool);
        // Compare only the upper triangle (the contract).
        std::vector<float> ru, gu, pu;
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = i; j < k; ++j) {
                ru.push_back(ref[static_cast<size_t>(i * k + j)]);
                gu.push_back(got[static_cast<size_t>(i * k + j)]);
                pu.push_back(got_pool[static_cast<size_t>(i * k + j)]);
            }
        EXPECT_LT(max_rel_diff(gu, ru), k_tol_gemm) << n << "x" << k;
        EXPECT_LT(max_rel_diff(pu, ru), k_tol_gemm) << n << "x" << k << " threaded";
        // The lower triangle is not the contract's: it must stay untouched.
        for (int64_t i = 1; i < k; ++i)
            ASSERT_EQ(got_pool[static_cast<size_t>(i * k)], ref[static_cast<size_t>(i * k)]);
    }
}

TEST(linalg, cholesky_inverse_upper_matches_reference_and_inverts) {
    cpu::blas_init_single_threaded();
    std::mt19937 rng(12);
    for (int64_t k : {1, 2, 5, 31, 64, 130}) {
        const auto h   = random_spd(k, rng);
        auto       ref = h, got = h;
        ASSERT_TRUE(cpu::cholesky_inverse_upper_ref(ref.data(), k));
        ASSERT_TRUE(cpu::cholesky_inverse_upper(got.data(), k));
        EXPECT_LT(max_rel_diff(got, ref), k_tol_chol) << k;
        // U upper with U^T U H = I.
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < i; ++j) ASSERT_EQ(got[static_cast<size_t>(i * k + j)], 0.0f);
        std::vector<float> utu(static_cast<size_t>(k * k)), prod(static_cast<size_t>(k * k));
        cpu::sgemm_ref(true, false, k, k, k, 1.0f, got.data(), k, got.data(), k, 0.0f, utu.data(), k);
        cpu::sgemm_ref(false, false, k, k, k, 1.0f, utu.data(), k, h.data(), k, 0.0f, prod.data(), k);
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j)
                EXPECT_NEAR(prod[static_cast<size_t>(i * k + j)], i == j ? 1.0f : 0.0f, 2e-3)
                    << k << " " << i << " " << j;
    }
}

TEST(linalg, cholesky_rejects_indefinite) {
    std::vector<float> a = {1.0f, 2.0f, 2.0f, 1.0f};  // eigenvalues 3, -1
    auto               b = a, c = a;
    EXPECT_FALSE(cpu::cholesky_inverse_upper_ref(a.data(), 2));
    EXPECT_FALSE(cpu::cholesky_inverse_upper(b.data(), 2));
    EXPECT_FALSE(cpu::cholesky_lower(c.data(), 2));
}

TEST(linalg, sgemm_matches_reference_all_transposes) {
    cpu::blas_init_single_threaded();
    std::mt19937 rng(13);
    thread_pool  pool(3);
    for (auto [m, n, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 1}, {1, 7, 3}, {5, 1, 9}, {33, 17, 65}, {130, 33, 7}, {64, 128, 128}}) {
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb) {
                const int64_t lda = ta ? m + 2 : k + 1, ldb = tb ? k + 3 : n, ldc = n + 1;
                auto          a   = randn(static_cast<size_t>((ta ? k : m) * lda), rng);
                auto          b   = randn(static_cast<size_t>((tb ? n : k) * ldb), rng);
                auto          ref = randn(static_cast<size_t>(m * ldc), rng);
                auto          got = ref;
                cpu::sgemm_ref(ta, tb, m, n, k, -0.75f, a.data(), lda, b.data(), ldb, 0.5f, ref.data(), ldc);
                cpu::sgemm(ta, tb, m, n, k, -0.75f, a.data(), lda, b.data(), ldb, 0.5f, got.data(), ldc, &pool);
                EXPECT_LT(max_rel_diff(got, ref), k_tol_gemm) << m << " " << n << " " << k << " " << ta << tb;
            }
    }
}
