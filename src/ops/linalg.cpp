#include "ops/linalg.h"

#include "kernels/cpu/linalg.h"
#include "kernels/cpu/linear.h"

namespace gptq {

void op_gram_accumulate_upper(const ops_context& ctx, const float* x, int64_t n, int64_t k, float alpha, float* h) {
    if (ctx.reference) return cpu::gram_accumulate_upper_ref(x, n, k, alpha, h);
    cpu::blas_init_single_threaded();
    cpu::gram_accumulate_upper(x, n, k, alpha, h, ctx.pool);
}

bool op_cholesky_inverse_upper(const ops_context& ctx, float* a, int64_t n) {
    if (ctx.reference) return cpu::cholesky_inverse_upper_ref(a, n);
    cpu::blas_init_single_threaded();
    return cpu::cholesky_inverse_upper(a, n);
}

void op_sgemm(const ops_context& ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    if (ctx.reference) return cpu::sgemm_ref(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    cpu::blas_init_single_threaded();
    cpu::sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ctx.pool);
}

}  // namespace gptq
