// The generic GPTQ kernel: a thread owns one output column n and 8 token rows, walks k, decodes
// q[k, n] from qweight (column-coalesced: neighbouring threads read neighbouring words) and, when
// g_idx[k] changes, the group's scale and zero; the activations go through shared memory in
// chunks of 64 k. Bits 3 codes straddle words and are read from both. F32 arithmetic throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gptq_linear.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_cols = 128;  // threads per block = output columns per block
constexpr int k_rows = 8;    // token rows per block
constexpr int k_kc   = 64;   // k per shared-memory chunk

// Code `idx` of a bit stream whose 32-bit word w sits at base[w * stride].
__device__ inline int code_at(const uint32_t* base, int64_t stride, int64_t idx, int bits) {
    const int64_t bit  = idx * bits;
    const int64_t word = bit >> 5;
    const int     sh   = int(bit & 31);
    uint32_t      v    = base[word * stride] >> sh;
    if (sh + bits > 32) v |= base[(word + 1) * stride] << (32 - sh);
    return int(v & ((1u << bits) - 1u));
}

__global__ void __launch_bounds__(k_cols) gptq_generic_kernel(gptq_linear_params w, const __half* x, __half* y,
                                                              int64_t m, int64_t x_stride, int64_t y_stride) {
    __shared__ float xs[k_rows][k_kc];
    const int64_t    n           = int64_t(blockIdx.x) * k_cols + threadIdx.x;
    const int64_t    r0          = int64_t(blockIdx.y) * k_rows;
    const uint32_t*  qw          = reinterpret_cast<const uint32_t*>(w.qweight);
    const int64_t    zw          = w.n_out * w.bits / 32;  // words per qzeros row
    float            acc[k_rows] = {};
    int              cur_g       = -1;
    float            scale = 0.0f, zero = 0.0f;
    for (int64_t kc = 0; kc < w.n_in; kc += k_kc) {
        __syncthreads();
        for (int i = threadIdx.x; i < k_rows * k_kc; i += k_cols) {
            const int64_t r = r0 + i / k_kc, kk = kc + i % k_kc;
            xs[i / k_kc][i % k_kc] = (r < m && kk < w.n_in) ? __half2float(x[r * x_stride + kk]) : 0.0f;
        }
        __syncthreads();
        if (n >= w.n_out) continue;
        const int64_t kend = kc + k_kc < w.n_in ? kc + k_kc : w.n_in;
        for (int64_t k = kc; k < kend; ++k) {
            const int g = w.g_idx[k];
            if (g != cur_g) {
                cur_g = g;
                scale = __half2float(reinterpret_cast<const __half*>(w.scales)[int64_t(g) * w.n_out + n]);
                zero  = float(code_at(reinterpret_cast<const uint32_t*>(w.qzeros) + int64_t(g) * zw, 1, n, w.bits) +
                             w.zero_add);
            }
            const float wv = scale * (float(code_at(qw + n, w.n_out, k, w.bits)) - zero);
#pragma unroll
            for (int r = 0; r < k_rows; ++r) acc[r] += xs[r][k - kc] * wv;
        }
    }
    if (n >= w.n_out) return;
    const float b = w.bias ? __half2float(reinterpret_cast<const __half*>(w.bias)[n]) : 0.0f;
#pragma unroll
    for (int r = 0; r < k_rows; ++r)
        if (r0 + r < m) y[(r0 + r) * y_stride + n] = __float2half_rn(acc[r] + b);
}

__device__ inline void store_weight(float* p, float v) {
    *p = v;
}
__device__ inline void store_weight(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
}
// Grid: x over k in blocks of 256 (one k per thread: coalesced writes along the row), y over the
// output rows (looping past 65535 rows): no 64-bit division per weight.
template <typename T>
__global__ void gptq_dequant_kernel(gptq_linear_params w, T* out) {
    const uint32_t* qw = reinterpret_cast<const uint32_t*>(w.qweight);
    const uint32_t* qz = reinterpret_cast<const uint32_t*>(w.qzeros);
    const int64_t   zw = w.n_out * w.bits / 32;
    const int64_t   k  = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k >= w.n_in) return;
    const int g = w.g_idx[k];
    for (int64_t n = blockIdx.y; n < w.n_out; n += gridDim.y) {
        const float scale = __half2float(reinterpret_cast<const __half*>(w.scales)[int64_t(g) * w.n_out + n]);
        const float zero  = float(code_at(qz + int64_t(g) * zw, 1, n, w.bits) + w.zero_add);
        store_weight(out + n * w.n_in + k, scale * (float(code_at(qw + n, w.n_out, k, w.bits)) - zero));
    }
}

}  // namespace

namespace {
template <typename T>
status gptq_dequant(const gptq_linear_params& w, T* out, cudaStream_t stream) {
    if (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8)
        return make_error(status_code::STATUS_UNSUPPORTED, "gptq_dequant: bits {} not in 2, 3, 4, 8", w.bits);
    if (w.n_in <= 0 || w.n_out <= 0 || (w.n_in * w.bits) % 32 != 0 || (w.n_out * w.bits) % 32 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "gptq_dequant: n_in {} / n_out {} cannot hold {}-bit packing", w.n_in, w.n_out, w.bits);
    const dim3 grid(unsigned((w.n_in + 255) / 256), unsigned(std::min<int64_t>(w.n_out, 65535)));
    gptq_dequant_kernel<T><<<grid, 256, 0, stream>>>(w, out);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}
}  // namespace

status gptq_dequant_f32(const gptq_linear_params& w, float* out, cudaStream_t stream) {
    return gptq_dequant(w, out, stream);
}

status gptq_dequant_bf16(const gptq_linear_params& w, uint16_t* out, cudaStream_t stream) {
    return gptq_dequant(w, reinterpret_cast<__nv_bfloat16*>(out), stream);
}

status gptq_linear_generic_f16(const gptq_linear_params& w, const uint16_t* x, uint16_t* y, int64_t m, int64_t x_stride,
                               int64_t y_stride, cudaStream_t stream) {
    if (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8)
        return make_error(status_code::STATUS_UNSUPPORTED, "gptq_linear_generic_f16: bits {} not in 2, 3, 4, 8",
                          w.bits);
    if (w.n_in <= 0 || w.n_out <= 0 || w.n_groups <= 0 || (w.n_in * w.bits) % 32 != 0 || (w.n_out * w.bits) % 32 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "gptq_linear_generic_f16: n_in {} / n_out {} / n_groups {} cannot hold {}-bit packing",
                          w.n_in, w.n_out, w.n_groups, w.bits);
    if (x_stride < w.n_in || y_stride < w.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "gptq_linear_generic_f16: x_stride {} or y_stride {}",
                          x_stride, y_stride);
    if (m <= 0) return status::ok();
    if ((m + k_rows - 1) / k_rows > 65535)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "gptq_linear_generic_f16: m {} too large", m);
    const dim3 grid(unsigned((w.n_out + k_cols - 1) / k_cols), unsigned((m + k_rows - 1) / k_rows));
    gptq_generic_kernel<<<grid, k_cols, 0, stream>>>(w, reinterpret_cast<const __half*>(x),
                                                     reinterpret_cast<__half*>(y), m, x_stride, y_stride);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
