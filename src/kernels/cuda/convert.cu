// F16/BF16 <-> F32 conversion kernels: grid-stride loops, one element per thread per step.
// The hardware intrinsics round to nearest even, matching core/dtype.cpp bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/cuda_check.h"

namespace gptq::cuda {

namespace {

constexpr int k_block = 256;

__global__ void f16_to_f32_kernel(const __half* src, float* dst, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __half2float(src[i]);
}
__global__ void f32_to_f16_kernel(const float* src, __half* dst, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}
__global__ void bf16_to_f32_kernel(const __nv_bfloat16* src, float* dst, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + k_block - 1) / k_block;
    return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

status f16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    f16_to_f32_kernel<<<grid_for(n), k_block, 0, stream>>>(reinterpret_cast<const __half*>(src), dst, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status f32_to_f16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    f32_to_f16_kernel<<<grid_for(n), k_block, 0, stream>>>(src, reinterpret_cast<__half*>(dst), n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status bf16_to_f32(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    bf16_to_f32_kernel<<<grid_for(n), k_block, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(src), dst, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
