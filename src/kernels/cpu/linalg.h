// Dense linear algebra for GPTQ on the CPU: Gram-matrix accumulation (H += a X^T X), Cholesky
// factorisation and inverse, and a general row-major sgemm. Each has a plain reference that the
// tests trust and a BLAS/LAPACK version (OpenBLAS). All matrices are row-major F32.
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// h[k, k] (upper triangle, j >= i) += alpha * x^T x, x: [n, k]. The lower triangle is not touched.
void gram_accumulate_upper_ref(const float* x, int64_t n, int64_t k, float alpha, float* h);
// Same contract; blocks of 64 rows of h are split over the pool (one single-threaded sgemm each:
// h[b, b0:] += alpha x[:, b]^T x[:, b0:]), so the accumulation scales with threads.
void gram_accumulate_upper(const float* x, int64_t n, int64_t k, float alpha, float* h, thread_pool* pool = nullptr);

// Copy the upper triangle of a[n, n] onto the lower one.
void symmetrize_from_upper(float* a, int64_t n);

// In place: a[n, n] symmetric positive definite -> its lower Cholesky factor L (a = L L^T) in the
// lower triangle; the strict upper triangle is set to zero. Returns false when a is not positive
// definite (a is then garbage).
bool cholesky_lower_ref(float* a, int64_t n);
bool cholesky_lower(float* a, int64_t n);

// In place: a[n, n] symmetric positive definite -> U, the upper Cholesky factor of a^-1
// (a^-1 = U^T U), strict lower triangle zero. This is the "Hinv" GPTQ's column loop reads.
// Returns false when a is not positive definite.
bool cholesky_inverse_upper_ref(float* a, int64_t n);
bool cholesky_inverse_upper(float* a, int64_t n);

// c[m, n] = alpha * op(a) op(b) + beta * c, row-major with leading dimensions lda/ldb/ldc;
// op(a) is [m, k] (a^T when trans_a, stored [k, m]), op(b) is [k, n] (b^T when trans_b, stored [n, k]).
void sgemm_ref(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
// Same contract; the rows of c are split over the pool (each slice one single-threaded sgemm).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc, thread_pool* pool);

}  // namespace gptq::cpu
