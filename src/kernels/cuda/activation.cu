// SiLU-multiply, residual-add and bias-add kernels: grid-stride loops, one element per thread per step.
#include <cuda_fp16.h>

#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/decode_math.cuh"
#include "kernels/cuda/launch.cuh"

namespace gptq::cuda {

namespace {

unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + 255) / 256;
    return unsigned(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// Feature i's column in gate / up: i, or with gate/up interleaved in blocks of `block` features
// (the fused decode layout, gptq_int4.cuh int4_gemv_fusion::act: 32-row tiles of block gate rows then
// block up rows; up = gate + block) (i / block) 2 block + i % block.
__device__ __forceinline__ int64_t act_col(int64_t i, int64_t block) {
    return block ? (i / block) * 2 * block + i % block : i;
}

template <act_kind A>
__global__ void act_mul_kernel(const __half* gate, const __half* up, __half* y, int64_t n_rows, int64_t n_cols,
                               int64_t gate_stride, int64_t up_stride, int64_t y_stride, const int32_t* perm,
                               int64_t block) {
    pdl_launch_dependents();
    pdl_wait();  // gate and up come from the projection before
    const int64_t n = n_rows * n_cols;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = p / n_cols, i = p % n_cols, j = act_col(perm ? int64_t(perm[i]) : i, block);
        y[r * y_stride + i] = act_mul_h<A>(gate[r * gate_stride + j], up[r * up_stride + j]);
    }
}

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] = tanhf(x[i] / cap) * cap;
}

template <act_kind A>
status act_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                   int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream, const int32_t* perm,
                   int64_t block) {
    if (n_rows <= 0 || n_cols <= 0) return status::ok();
    if (block < 0 || (block > 0 && n_cols % block != 0))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "act_mul_f16: interleave block {} does not divide the {} features", block, n_cols);
    GPTQ_CUDA_CHECK(launch_pdl(act_mul_kernel<A>, dim3(grid_for(n_rows * n_cols)), dim3(256), 0, stream,
                               reinterpret_cast<const __half*>(gate), reinterpret_cast<const __half*>(up),
                               reinterpret_cast<__half*>(y), n_rows, n_cols, gate_stride, up_stride, y_stride, perm,
                               block));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

__global__ void add_kernel(__half* x, const __half* y, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] = __float2half_rn(__half2float(x[i]) + __half2float(y[i]));
}

__global__ void add_bias_kernel(__half* x, const __half* bias, int64_t n_rows, int64_t n_cols, int64_t x_stride) {
    const int64_t n = n_rows * n_cols;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = p / n_cols, i = p % n_cols;
        __half&       v = x[r * x_stride + i];
        v               = __float2half_rn(__half2float(v) + __half2float(bias[i]));
    }
}

}  // namespace

status silu_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                    int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream, const int32_t* perm,
                    int64_t block) {
    return act_mul_f16<act_kind::SILU>(gate, up, y, n_rows, n_cols, gate_stride, up_stride, y_stride, stream, perm,
                                       block);
}

status gelu_tanh_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                         int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream,
                         const int32_t* perm, int64_t block) {
    return act_mul_f16<act_kind::GELU_TANH>(gate, up, y, n_rows, n_cols, gate_stride, up_stride, y_stride, stream, perm,
                                            block);
}

status softcap_f32(float* x, int64_t n, float cap, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    if (!(cap > 0.0f)) return make_error(status_code::STATUS_INVALID_ARGUMENT, "softcap_f32: cap {} <= 0", cap);
    softcap_kernel<<<grid_for(n), 256, 0, stream>>>(x, n, cap);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status add_f16(uint16_t* x, const uint16_t* y, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    add_kernel<<<grid_for(n), 256, 0, stream>>>(reinterpret_cast<__half*>(x), reinterpret_cast<const __half*>(y), n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status add_bias_f16(uint16_t* x, const uint16_t* bias, int64_t n_rows, int64_t n_cols, int64_t x_stride,
                    cudaStream_t stream) {
    if (n_rows <= 0 || n_cols <= 0) return status::ok();
    if (x_stride < n_cols)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "add_bias_f16: x_stride {} < n_cols {}", x_stride,
                          n_cols);
    add_bias_kernel<<<grid_for(n_rows * n_cols), 256, 0, stream>>>(
        reinterpret_cast<__half*>(x), reinterpret_cast<const __half*>(bias), n_rows, n_cols, x_stride);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
