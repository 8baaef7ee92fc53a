// RMSNorm kernel: one block per row, the sum of squares reduced in F32 over the block, the row
// read twice (the second read hits L1/L2: rows are at most a few tens of KB).
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/norm.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_block = 256;

__global__ void rms_norm_kernel(const __half* x, const __half* w, __half* y, int64_t dim, int64_t x_stride,
                                int64_t y_stride, float eps) {
    const __half* xr = x + blockIdx.x * x_stride;
    __half*       yr = y + blockIdx.x * y_stride;
    float         ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = __half2float(xr[i]);
        ss += v * v;
    }
    __shared__ float partial[k_block / 32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < k_block / 32; ++i) total += partial[i];
    const float inv = rsqrtf(total / float(dim) + eps);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = __float2half_rn(__half2float(xr[i]) * inv * __half2float(w[i]));
}

}  // namespace

status rms_norm_f16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_rows, int64_t dim, int64_t x_stride,
                    int64_t y_stride, float eps, cudaStream_t stream) {
    if (n_rows <= 0 || dim <= 0) return status::ok();
    if (n_rows > 0x7fffffff)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "rms_norm_f16: n_rows {} too large", n_rows);
    rms_norm_kernel<<<unsigned(n_rows), k_block, 0, stream>>>(
        reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(w), reinterpret_cast<__half*>(y), dim,
        x_stride, y_stride, eps);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
