// cuBLAS GEMM wrapper. Row-major y = x w^T is column-major y^T = w x^T: cuBLAS sees w as a
// column-major [k, n] matrix (transposed: OP_T) and x as a column-major [k, m] one (OP_N).
#include <cublas_v2.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.cuh"

namespace gptq::cuda {

namespace {
status gemm_check(int64_t m, int64_t n, int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride) {
    const int64_t lim = 0x7fffffff;
    if (m > lim || n > lim || k > lim || x_stride > lim || w_stride > lim || y_stride > lim)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "gemm: sizes m={} n={} k={} exceed int32", m, n, k);
    if (x_stride < k || w_stride < k || y_stride < n)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "gemm: strides x={} w={} y={} smaller than k={} / n={}",
                          x_stride, w_stride, y_stride, k, n);
    return status::ok();
}
}  // namespace

status gemm(cublasHandle_t handle, gemm_dtype dtype, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m,
            int64_t n, int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride, float alpha, float beta,
            cudaStream_t stream) {
    if (m <= 0 || n <= 0) return status::ok();
    GPTQ_TRY(gemm_check(m, n, k, x_stride, w_stride, y_stride));
    const cudaDataType_t t = dtype == gemm_dtype::f16 ? CUDA_R_16F : CUDA_R_16BF;
    GPTQ_CUBLAS_CHECK(cublasSetStream(handle, stream));
    GPTQ_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, w, t,
                                   int(w_stride), x, t, int(x_stride), &beta, y, t, int(y_stride), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
    return status::ok();
}

status gemm_f32_out(cublasHandle_t handle, gemm_dtype dtype, const uint16_t* x, const uint16_t* w, float* y, int64_t m,
                    int64_t n, int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride, cudaStream_t stream,
                    float beta) {
    if (m <= 0 || n <= 0) return status::ok();
    GPTQ_TRY(gemm_check(m, n, k, x_stride, w_stride, y_stride));
    const cudaDataType_t t     = dtype == gemm_dtype::f16 ? CUDA_R_16F : CUDA_R_16BF;
    const float          alpha = 1.0f;
    GPTQ_CUBLAS_CHECK(cublasSetStream(handle, stream));
    GPTQ_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, w, t,
                                   int(w_stride), x, t, int(x_stride), &beta, y, CUDA_R_32F, int(y_stride),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return status::ok();
}

}  // namespace gptq::cuda
