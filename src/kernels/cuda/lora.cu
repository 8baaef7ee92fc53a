// LoRA add kernel (lora.cuh). Grid: (rows, column blocks of 256 outputs). Each block first computes
// its row's t = x A^T (r dot products of length n_in: one warp per rank, lanes striding the
// inputs, a warp-shuffle sum) into shared memory, then each thread one output column:
// y[o] += scale * sum_k t[k] B[o, k]. Every column block recomputes t (r * n_in multiply-adds: for
// r = 16 and n_in = 4096, 64K per block), which costs less than a second launch for decode sizes.
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/lora.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_threads = 256;  // outputs per block, and 8 warps for the A products

__global__ void lora_add_kernel(const __half* x, __half* y, int64_t n_in, int64_t n_out, int64_t y_stride,
                                const int32_t* row_adapter, const lora_slot* slots) {
    extern __shared__ float t[];  // [r]
    pdl_launch_dependents();
    pdl_wait();  // x and y come from the ops before (and the step inputs' adapter ids)
    const int64_t row = blockIdx.x;
    const int32_t k   = row_adapter[row];
    if (k < 0) return;
    const lora_slot s = slots[k];
    if (s.r == 0) return;
    const __half* xr   = x + row * n_in;
    const int     warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int32_t j = warp; j < s.r; j += k_threads / 32) {
        const float* a   = s.a + int64_t(j) * n_in;
        float        acc = 0.0f;
        for (int64_t i = lane; i < n_in; i += 32) acc += __half2float(xr[i]) * a[i];
        for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) t[j] = acc;
    }
    __syncthreads();
    const int64_t o = int64_t(blockIdx.y) * k_threads + threadIdx.x;
    if (o >= n_out) return;
    const float* b   = s.b + o * s.r;
    float        acc = 0.0f;
    for (int32_t j = 0; j < s.r; ++j) acc += t[j] * b[j];
    __half& v = y[row * y_stride + o];
    v         = __float2half_rn(__half2float(v) + s.scale * acc);
}

}  // namespace

status lora_add_f16(const uint16_t* x, uint16_t* y, int64_t n_rows, int64_t n_in, int64_t n_out, int64_t y_stride,
                    const int32_t* row_adapter, const lora_slot* slots, int32_t max_r, cudaStream_t stream) {
    if (n_rows <= 0 || n_out <= 0 || max_r <= 0) return status::ok();
    if (max_r > k_lora_max_r || n_rows > 0x7fffffff)
        return make_error(status_code::STATUS_UNSUPPORTED, "LoRA add of {} rows with r up to {} (at most {})", n_rows,
                          max_r, k_lora_max_r);
    const dim3 grid(unsigned(n_rows), unsigned((n_out + k_threads - 1) / k_threads));
    GPTQ_CUDA_CHECK(launch_pdl(lora_add_kernel, grid, dim3(k_threads), size_t(max_r) * sizeof(float), stream,
                               reinterpret_cast<const __half*>(x), reinterpret_cast<__half*>(y), n_in, n_out, y_stride,
                               row_adapter, slots));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
