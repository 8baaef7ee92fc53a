// RoPE kernel: one thread per (token, head, i < half) pair, so each thread reads and writes the
// two values it rotates and nothing else; F32 arithmetic, one F16 rounding per output.
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/decode_math.cuh"
#include "kernels/cuda/launch.cuh"
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
        row[i]        = rope_lo(a, b, c, s);
        row[i + half] = rope_hi(a, b, c, s);
    }
}

// One thread per item of a token: n_head * half q pairs, then n_head_kv * half k pairs, then kv_dim
// v values.
__global__ void rope_kv_store_kernel(__half* q, const __half* k, const __half* v, int64_t q_stride, int64_t kv_stride,
                                     const float* cos, const float* sin, int64_t n_items, int64_t n_head,
                                     int64_t n_head_kv, int64_t half, __half* cache_k, __half* cache_v,
                                     const int32_t* pos_dev, const int32_t* seq_dev, kv_page_dev pages, int64_t n_ctx,
                                     int64_t total) {
    pdl_launch_dependents();
    pdl_wait();  // q, k, v come from the projection before
    const int64_t kv_dim = n_head_kv * 2 * half, nq = n_head * half, nk = n_head_kv * half;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < total; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t t = p / n_items, it = p % n_items, pos = int64_t(pos_dev[t]);
        // The pool row of token t's position in its sequence (paged), or the position itself.
        const int64_t row   = pos >= 0 && pos < n_ctx ? kv_page_row(pages, seq_dev ? seq_dev[t] : 0, pos) : -1;
        const bool    store = row >= 0;
        if (it < nq + nk) {
            const bool    is_q = it < nq;
            const int64_t r    = is_q ? it : it - nq;
            const int64_t i = r % half, hh = r / half;
            const __half* src = (is_q ? q + t * q_stride : k + t * kv_stride) + hh * 2 * half;
            const float   c = cos[t * half + i], s = sin[t * half + i];
            const float   a = __half2float(src[i]), b = __half2float(src[i + half]);
            const __half  lo = rope_lo(a, b, c, s), hi = rope_hi(a, b, c, s);
            if (is_q) {
                __half* dst   = q + t * q_stride + hh * 2 * half;
                dst[i]        = lo;
                dst[i + half] = hi;
            } else if (store) {
                __half* dst   = cache_k + row * kv_dim + hh * 2 * half;
                dst[i]        = lo;
                dst[i + half] = hi;
            }
        } else if (store) {
            const int64_t i           = it - nq - nk;
            cache_v[row * kv_dim + i] = v[t * kv_stride + i];
        }
    }
}

}  // namespace

status rope_kv_store_f16(uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t q_stride, int64_t kv_stride,
                         const float* cos, const float* sin, int64_t n_tokens, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, uint16_t* cache_k, uint16_t* cache_v, const int32_t* pos_dev,
                         const int32_t* seq_dev, const kv_page_map& pages, int64_t n_ctx, cudaStream_t stream) {
    if (head_dim % 2 != 0 || q_stride < n_head * head_dim || kv_stride < n_head_kv * head_dim)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "rope_kv_store_f16: head_dim {} (must be even), q_stride {}, kv_stride {}", head_dim,
                          q_stride, kv_stride);
    if (seq_dev && !pages.pages)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "rope_kv_store_f16: per-token sequences (seq_dev) need a page table");
    GPTQ_TRY(kv_page_map_check(pages, n_ctx, "rope_kv_store_f16"));
    const int64_t half    = head_dim / 2;
    const int64_t n_items = (n_head + n_head_kv) * half + n_head_kv * head_dim;
    const int64_t total   = n_tokens * n_items;
    if (total <= 0) return status::ok();
    const int64_t blocks = (total + 255) / 256;
    GPTQ_CUDA_CHECK(launch_pdl(rope_kv_store_kernel, dim3(unsigned(blocks < 65535 ? blocks : 65535)), dim3(256), 0,
                               stream, reinterpret_cast<__half*>(q), reinterpret_cast<const __half*>(k),
                               reinterpret_cast<const __half*>(v), q_stride, kv_stride, cos, sin, n_items, n_head,
                               n_head_kv, half, reinterpret_cast<__half*>(cache_k), reinterpret_cast<__half*>(cache_v),
                               pos_dev, seq_dev, kv_page_dev_of(pages), n_ctx, total));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

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
