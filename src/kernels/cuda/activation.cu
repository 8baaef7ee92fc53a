// SiLU-multiply, residual-add and bias-add kernels: grid-stride loops, one element per thread per step.
#include <cuda_fp16.h>

#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"

namespace gptq::cuda {

namespace {

unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + 255) / 256;
    return unsigned(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

// act(g) * u in F32: SiLU, or GELU with the tanh approximation (transformers' gelu_pytorch_tanh,
// the formula of kernels/cpu/activation.cpp in F32).
enum class act_kind { SILU, GELU_TANH };
template <act_kind A>
__device__ inline float act_mul(float g, float u) {
    if constexpr (A == act_kind::SILU) {
        return g / (1.0f + expf(-g)) * u;
    } else {
        constexpr float beta  = 0.7978845608028654f;  // sqrt(2 / pi)
        constexpr float kappa = 0.044715f;
        const float     inner = beta * (g + kappa * (g * g * g));
        return 0.5f * g * (1.0f + tanhf(inner)) * u;
    }
}

template <act_kind A>
__global__ void act_mul_kernel(const __half* gate, const __half* up, __half* y, int64_t n_rows, int64_t n_cols,
                               int64_t gate_stride, int64_t up_stride, int64_t y_stride, const int32_t* perm) {
    pdl_launch_dependents();
    pdl_wait();  // gate and up come from the projection before
    const int64_t n = n_rows * n_cols;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = p / n_cols, i = p % n_cols, j = perm ? int64_t(perm[i]) : i;
        const float   g     = __half2float(gate[r * gate_stride + j]);
        const float   u     = __half2float(up[r * up_stride + j]);
        y[r * y_stride + i] = __float2half_rn(act_mul<A>(g, u));
    }
}

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] = tanhf(x[i] / cap) * cap;
}

template <act_kind A>
status act_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                   int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream, const int32_t* perm) {
    if (n_rows <= 0 || n_cols <= 0) return status::ok();
    GPTQ_CUDA_CHECK(launch_pdl(act_mul_kernel<A>, dim3(grid_for(n_rows * n_cols)), dim3(256), 0, stream,
                               reinterpret_cast<const __half*>(gate), reinterpret_cast<const __half*>(up),
                               reinterpret_cast<__half*>(y), n_rows, n_cols, gate_stride, up_stride, y_stride, perm));
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
                    int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream,
                    const int32_t* perm) {
    return act_mul_f16<act_kind::SILU>(gate, up, y, n_rows, n_cols, gate_stride, up_stride, y_stride, stream, perm);
}

status gelu_tanh_mul_f16(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows, int64_t n_cols,
                         int64_t gate_stride, int64_t up_stride, int64_t y_stride, cudaStream_t stream,
                         const int32_t* perm) {
    return act_mul_f16<act_kind::GELU_TANH>(gate, up, y, n_rows, n_cols, gate_stride, up_stride, y_stride, stream,
                                            perm);
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
