#include "kernels/cpu/linalg.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/thread_pool.h"

// LAPACK (shipped inside OpenBLAS). Fortran is column-major: a row-major symmetric matrix is the
// same array, and the Fortran "U" triangle is our lower triangle.
extern "C" {
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info);
void spotri_(const char* uplo, const int* n, float* a, const int* lda, int* info);
}

namespace gptq::cpu {

void gram_accumulate_upper_ref(const float* x, int64_t n, int64_t k, float alpha, float* h) {
    for (int64_t i = 0; i < k; ++i)
        for (int64_t j = i; j < k; ++j) {
            double s = 0;
            for (int64_t r = 0; r < n; ++r) s += static_cast<double>(x[r * k + i]) * x[r * k + j];
            h[i * k + j] += static_cast<float>(alpha * s);
        }
}

void gram_accumulate_upper(const float* x, int64_t n, int64_t k, float alpha, float* h, thread_pool* pool) {
    if (n == 0 || k == 0) return;
    constexpr int64_t bs       = 64;
    const int64_t     n_blocks = (k + bs - 1) / bs;
    auto              block    = [&](int64_t b) {
        const int64_t r0 = b * bs, rn = std::min(bs, k - r0);
        // Diagonal block with syrk (upper), the rest of the block row with one gemm.
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(rn), static_cast<int>(n), alpha, x + r0,
                                    static_cast<int>(k), 1.0f, h + r0 * k + r0, static_cast<int>(k));
        if (r0 + rn < k)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(rn), static_cast<int>(k - r0 - rn),
                                        static_cast<int>(n), alpha, x + r0, static_cast<int>(k), x + r0 + rn, static_cast<int>(k), 1.0f,
                                        h + r0 * k + r0 + rn, static_cast<int>(k));
    };
    if (!pool || n_blocks == 1) {
        for (int64_t b = 0; b < n_blocks; ++b) block(b);
        return;
    }
    // Early blocks carry more of the triangle: interleave them over the workers.
    const int64_t n_workers = std::min<int64_t>(pool->n_threads(), n_blocks);
    pool->parallel_for(n_workers, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w)
            for (int64_t b = w; b < n_blocks; b += n_workers) block(b);
    });
}

void symmetrize_from_upper(float* a, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
}

bool cholesky_lower_ref(float* a, int64_t n) {
    // Column by column (Cholesky–Banachiewicz) in double.
    std::vector<double> l(static_cast<size_t>(n * n), 0.0);
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
            double s = a[i * n + j];
            for (int64_t p = 0; p < j; ++p) s -= l[static_cast<size_t>(i * n + p)] * l[static_cast<size_t>(j * n + p)];
            if (i == j) {
                if (!(s > 0.0)) return false;
                l[static_cast<size_t>(i * n + i)] = std::sqrt(s);
            } else {
                l[static_cast<size_t>(i * n + j)] = s / l[static_cast<size_t>(j * n + j)];
            }
        }
    }
    for (int64_t i = 0; i < n * n; ++i) a[i] = static_cast<float>(l[static_cast<size_t>(i)]);
    return true;
}

bool cholesky_lower(float* a, int64_t n) {
    if (n == 0) return true;
    const int nn   = static_cast<int>(n);
    int       info = 0;
    spotrf_("U", &nn, a, &nn, &info);  // Fortran upper == our lower
    if (info != 0) return false;
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = 0.0f;
    return true;
}

bool cholesky_inverse_upper_ref(float* a, int64_t n) {
    // L = chol(a); a^-1 = L^-T L^-1; U = chol(a^-1) upper, all in double.
    if (!cholesky_lower_ref(a, n)) return false;
    const auto          N = static_cast<size_t>(n);
    std::vector<double> linv(N * N, 0.0);  // L^-1, lower triangular, by forward substitution
    for (size_t c = 0; c < N; ++c) {
        linv[c * N + c] = 1.0 / a[c * N + c];
        for (size_t r = c + 1; r < N; ++r) {
            double s = 0;
            for (size_t p = c; p < r; ++p) s += a[r * N + p] * linv[p * N + c];
            linv[r * N + c] = -s / a[r * N + r];
        }
    }
    std::vector<float> inv(N * N);
    for (size_t i = 0; i < N; ++i)
        for (size_t j = 0; j < N; ++j) {
            double s = 0;
            for (size_t p = std::max(i, j); p < N; ++p) s += linv[p * N + i] * linv[p * N + j];
            inv[i * N + j] = static_cast<float>(s);
        }
    // inv = L L^T with L lower, so U = L^T is the upper factor: inv = U^T U.
    if (!cholesky_lower_ref(inv.data(), n)) return false;
    for (size_t i = 0; i < N; ++i)
        for (size_t j = 0; j < N; ++j) a[i * N + j] = inv[j * N + i];
    return true;
}

bool cholesky_inverse_upper(float* a, int64_t n) {
    if (n == 0) return true;
    const int nn   = static_cast<int>(n);
    int       info = 0;
    spotrf_("U", &nn, a, &nn, &info);  // our lower L
    if (info != 0) return false;
    spotri_("U", &nn, a, &nn, &info);  // a^-1 in our lower triangle
    if (info != 0) return false;
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = a[j * n + i];
    spotrf_("L", &nn, a, &nn, &info);  // Fortran lower == our upper: a^-1 = U^T U
    if (info != 0) return false;
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < i; ++j) a[i * n + j] = 0.0f;
    return true;
}

void sgemm_ref(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t p = 0; p < k; ++p) {
                const float av = trans_a ? a[p * lda + i] : a[i * lda + p];
                const float bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
                s += static_cast<double>(av) * bv;
            }
            const float prev = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
            c[i * ldc + j]   = static_cast<float>(alpha * s) + prev;
        }
}

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc, thread_pool* pool) {
    if (m == 0 || n == 0) return;
    auto run = [&](int64_t r0, int64_t r1) {
        const float* a0 = trans_a ? a + r0 : a + r0 * lda;
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<int>(r1 - r0), static_cast<int>(n), static_cast<int>(k), alpha, a0,
                    static_cast<int>(lda), b, static_cast<int>(ldb), beta, c + r0 * ldc, static_cast<int>(ldc));
    };
    const int64_t n_chunks = pool ? std::min<int64_t>(pool->n_threads(), (m + 15) / 16) : 1;
    if (n_chunks <= 1) {
        run(0, m);
        return;
    }
    pool->parallel_for(n_chunks, [&](int64_t c0, int64_t c1) {
        for (int64_t ci = c0; ci < c1; ++ci) run(ci * m / n_chunks, (ci + 1) * m / n_chunks);
    });
}

}  // namespace gptq::cpu
