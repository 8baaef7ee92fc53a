// The one check macro for CUDA runtime and cuBLAS calls: statement, function, file and line.
// Errors become a status (the caller decides); GPTQ_CUDA_CHECK_FATAL is for sticky device errors.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace gptq::cuda {

inline status cuda_status(cudaError_t err, const char* stmt, const char* func, const char* file, int line) {
    if (err == cudaSuccess) return status::ok();
    const auto code =
        err == cudaErrorMemoryAllocation ? status_code::STATUS_OUT_OF_MEMORY : status_code::STATUS_INTERNAL;
    return make_error(code, "CUDA error {} ({}) in '{}' at {} ({}:{})", cudaGetErrorName(err), cudaGetErrorString(err),
                      stmt, func, file, line);
}

inline status cublas_status_of(cublasStatus_t err, const char* stmt, const char* func, const char* file, int line) {
    if (err == CUBLAS_STATUS_SUCCESS) return status::ok();
    const auto code =
        err == CUBLAS_STATUS_ALLOC_FAILED ? status_code::STATUS_OUT_OF_MEMORY : status_code::STATUS_INTERNAL;
    return make_error(code, "cuBLAS error {} in '{}' at {} ({}:{})", cublasGetStatusName(err), stmt, func, file, line);
}

}  // namespace gptq::cuda

#define GPTQ_CUDA_CHECK(stmt) GPTQ_TRY(::gptq::cuda::cuda_status((stmt), #stmt, __func__, __FILE__, __LINE__))
#define GPTQ_CUBLAS_CHECK(stmt) GPTQ_TRY(::gptq::cuda::cublas_status_of((stmt), #stmt, __func__, __FILE__, __LINE__))
// After a kernel launch: the launch error always, and in debug builds a synchronize for async faults.
#ifdef NDEBUG
#define GPTQ_CUDA_CHECK_LAUNCH() GPTQ_CUDA_CHECK(cudaGetLastError())
#else
#define GPTQ_CUDA_CHECK_LAUNCH()                  \
    do {                                          \
        GPTQ_CUDA_CHECK(cudaGetLastError());      \
        GPTQ_CUDA_CHECK(cudaDeviceSynchronize()); \
    } while (0)
#endif
