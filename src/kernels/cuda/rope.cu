// RoPE kernel: one thread per (token, head, i < half) pair, so each thread reads and writes the
// two values it rotates and nothing else; F32 arithmetic, one F16 rounding per output.
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rope.cuh"

namespace gptq::cuda {

namespace {

__global__ void rope_kernel(__half* x, const float* cos, const float* sin, int64_t n_pairs, int64_t n_heads,
                            int64_t half, int64_t row_stride) {
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n_pairs;
         p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t i   = p % half;
        const int64_t h   = (p / half) % n_heads;
        const int64_t t   = p / (half * n_heads);
        __half*       row = x + t * row_stride + h * 2 * half;
        const float   c = cos[t * half + i], s = sin[t * half + i];
        const float   a = __half2float(row[i]), b = __half2float(row[i + half]);
        row[i]        = __float2half_rn(a * c - b * s);
        row[i + half] = __float2half_rn(b * c + a * s);
    }
}

}  // namespace

status rope_f16(uint16_t* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, cudaStream_t stream) {
    if (head_dim % 2 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "rope_f16: head_dim {} is odd", head_dim);
    const int64_t n_pairs = n_tokens * n_heads * (head_dim / 2);
    if (n_pairs <= 0) return status::ok();
    const int64_t blocks = (n_pairs + 255) / 256;
    rope_kernel<<<unsigned(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(
        reinterpret_cast<__half*>(x), cos, sin, n_pairs, n_heads, head_dim / 2, row_stride);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
