// RMSNorm kernel: one block per row, the sum of squares reduced in F32 over the block, the row
// read twice (the second read hits L1/L2: rows are at most a few tens of KB). The arithmetic and its
// order are decode_math.cuh's, shared with the int4 GEMV that folds the norm into its input.
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/decode_math.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/norm.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_add_block = k_rms_max_threads;  // a 4096-wide row: 4 values per thread, one round trip

__global__ void __launch_bounds__(k_add_block)
    add_rms_norm_kernel(__half* h, const __half* __restrict__ add, const __half* __restrict__ w, __half* y,
                        const int32_t* __restrict__ perm, int64_t dim, int64_t h_stride, int64_t add_stride,
                        int64_t y_stride, float eps) {
    pdl_launch_dependents();
    pdl_wait();  // h and add come from the kernels before
    __half* hr = h + blockIdx.x * h_stride;
    __half* yr = y + blockIdx.x * y_stride;
    float   ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        __half v = hr[i];
        if (add) {
            v     = __float2half_rn(__half2float(v) + __half2float(add[blockIdx.x * add_stride + i]));
            hr[i] = v;
        }
        const float f = __half2float(v);
        ss            = __fmaf_rn(f, f, ss);  // rms_thread_sumsq's order, with the add in the same pass
    }
    __shared__ float partial[k_add_block / 32];
    ss = rms_warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();  // also makes this block's writes to hr visible to the permuted reads below
    const float inv = rms_inv_from_partials(partial, int(blockDim.x / 32), dim, eps);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        const int64_t j = perm ? int64_t(perm[i]) : i;
        yr[i]           = rms_apply(hr[j], inv, w[j]);
    }
}

}  // namespace

status add_rms_norm_f16(uint16_t* h, const uint16_t* add, const uint16_t* w, uint16_t* y, const int32_t* perm,
                        int64_t n_rows, int64_t dim, int64_t h_stride, int64_t add_stride, int64_t y_stride, float eps,
                        cudaStream_t stream) {
    if (n_rows <= 0 || dim <= 0) return status::ok();
    if (n_rows > 0x7fffffff || h_stride < dim || y_stride < dim || (add && add_stride < dim))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "add_rms_norm_f16: n_rows {} / strides h {} add {} y {} do not fit dim {}", n_rows, h_stride,
                          add_stride, y_stride, dim);
    const int threads = rms_threads(dim);  // the reduction order of decode_math.cuh
    GPTQ_CUDA_CHECK(launch_pdl(add_rms_norm_kernel, dim3(unsigned(n_rows)), dim3(unsigned(threads)), 0, stream,
                               reinterpret_cast<__half*>(h), reinterpret_cast<const __half*>(add),
                               reinterpret_cast<const __half*>(w), reinterpret_cast<__half*>(y), perm, dim, h_stride,
                               add_stride, y_stride, eps));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rms_norm_f16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_rows, int64_t dim, int64_t x_stride,
                    int64_t y_stride, float eps, cudaStream_t stream) {
    // The add-and-norm kernel without the add: one reduction order for both, so that folding a
    // residual add into the norm changes no bit. In place (y == x) is safe: no permutation, and
    // each thread rewrites only the values it read.
    if (y == x && y_stride != x_stride)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "rms_norm_f16: in place with strides {} and {}",
                          x_stride, y_stride);
    return add_rms_norm_f16(const_cast<uint16_t*>(x), nullptr, w, y, nullptr, n_rows, dim, x_stride, dim, y_stride, eps,
                            stream);
}

}  // namespace gptq::cuda
