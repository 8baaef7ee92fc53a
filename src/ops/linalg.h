// ops for GPTQ's linear algebra (see kernels/cpu/linalg.h for the exact contracts).
#pragma once

#include <cstdint>

#include "ops/ops.h"

namespace gptq {

// h[k, k] upper triangle += alpha * x[n, k]^T x.
void op_gram_accumulate_upper(const ops_context& ctx, const float* x, int64_t n, int64_t k, float alpha, float* h);

// a[n, n] SPD -> upper Cholesky factor of a^-1 in place; false when a is not positive definite.
bool op_cholesky_inverse_upper(const ops_context& ctx, float* a, int64_t n);

// c = alpha * op(a) op(b) + beta * c (row-major; see cpu::sgemm).
void op_sgemm(const ops_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace gptq
