// Linear layer y = x W^T + b in F32, with PyTorch's weight layout ([n_out, n_in] row-major).
//
// linear_ref is the plain triple loop (double accumulation) that the tests trust. linear_blas
// splits the output features over the thread pool and runs one single-threaded OpenBLAS sgemm
// per slice, so all parallelism in the process comes from one pool (OpenBLAS is pinned to one
// thread by blas_init_single_threaded()).
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// Pin OpenBLAS to one thread (we parallelise around it). Idempotent; call before linear_blas.
void blas_init_single_threaded();

// x: [m, k] row-major; w: [n, k] row-major; bias: [n] or nullptr; y: [m, n] row-major (no alias).
void linear_ref(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k);
// Same contract. pool may be nullptr (serial).
void linear_blas(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
                 thread_pool* pool);

// The same with w in F16 bits ([n, k], kept F16 in memory; linear_f16.cpp): m <= 4 rows, a GEMV
// converting the weights in registers (F16C); more rows, tiles of w converted to F32 and sgemm.
void linear_f16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
                thread_pool* pool);
void linear_f16_ref(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k);
// Several F16 linears of the same input x [m, k] (q/k/v, gate/up of a dense layer): each job's y =
// x W^T + bias exactly as linear_f16 gives it alone, all of them in one pool dispatch (a decode
// step pays one wake-up and one join instead of one per layer). At most 8 jobs.
struct linear_f16_job {
    const uint16_t* w    = nullptr;  // [n, k]
    const float*    bias = nullptr;  // [n] or nullptr
    float*          y    = nullptr;  // [m, n]
    int64_t         n    = 0;
};
void linears_f16(const float* x, const linear_f16_job* jobs, int n_jobs, int64_t m, int64_t k, thread_pool* pool);

}  // namespace gptq::cpu
