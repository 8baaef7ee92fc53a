// cuBLAS GEMM wrappers for the dense linear layers: y = x w^T with F16 or BF16 operands and F32
// accumulation (CUBLAS_COMPUTE_32F), row-major PyTorch shapes. The handle is the caller's.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st*   cudaStream_t;
typedef struct cublasContext* cublasHandle_t;

namespace gptq::cuda {

enum class gemm_dtype { f16, bf16 };

// y[m, n] = alpha * x[m, k] w[n, k]^T + beta * y[m, n]. x: [m, x_stride], w: [n, w_stride],
// y: [m, y_stride], all of `dtype` (16-bit bits), device pointers; y does not alias x or w.
// The handle's stream is set to `stream`. Sums in F32. With beta != 0 the result is not always
// rounded once: on the H100 (session 10) cuBLAS rounded x w^T to F16 before adding beta * y for
// some shapes (docs/cuda.md, "Prefill GEMM").
status gemm(cublasHandle_t handle, gemm_dtype dtype, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m,
            int64_t n, int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride, float alpha, float beta,
            cudaStream_t stream);

// The same with an F32 output y[m, y_stride] = x w^T + beta y (alpha = 1; beta 1: a bias already in
// y, added in F32): for the lm_head, whose logits feed a log-softmax, so they are not rounded to F16.
status gemm_f32_out(cublasHandle_t handle, gemm_dtype dtype, const uint16_t* x, const uint16_t* w, float* y, int64_t m,
                    int64_t n, int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride, cudaStream_t stream,
                    float beta = 0.0f);

}  // namespace gptq::cuda
