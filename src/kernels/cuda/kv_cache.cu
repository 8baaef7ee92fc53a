// KV-cache append (kv_cache.cuh): one block per new row, both caches in one launch. Also the
// paged cache's map check (kv_pages.cuh).
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kv_cache.cuh"
#include "kernels/cuda/kv_pages.cuh"

namespace gptq::cuda {

namespace {

__global__ void kv_store_kernel(const uint16_t* k, const uint16_t* v, int64_t src_stride, uint16_t* cache_k,
                                uint16_t* cache_v, const int32_t* pos_dev, int64_t kv_dim, int64_t n_ctx) {
    const int64_t t   = blockIdx.x;
    const int64_t row = int64_t(*pos_dev) + t;
    if (row < 0 || row >= n_ctx) return;
    for (int64_t i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        cache_k[row * kv_dim + i] = k[t * src_stride + i];
        cache_v[row * kv_dim + i] = v[t * src_stride + i];
    }
}

}  // namespace

status kv_page_map_check(const kv_page_map& m, int64_t n_rows, const char* who) {
    if (!m.pages) return status::ok();
    if (m.page_size < 1 || (m.page_size & (m.page_size - 1)) != 0 || m.page_size > (int64_t(1) << 20))
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: KV page size {} is not a power of two <= 2^20",
                          who, m.page_size);
    if (m.pages_stride < 1 || n_rows > m.pages_stride * m.page_size)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "{}: {} KV rows need more than the page table's {} pages of {} positions per sequence", who,
                          n_rows, m.pages_stride, m.page_size);
    return status::ok();
}

status kv_store_f16(const uint16_t* k, const uint16_t* v, int64_t src_stride, uint16_t* cache_k, uint16_t* cache_v,
                    const int32_t* pos_dev, int64_t n_tokens, int64_t kv_dim, int64_t n_ctx, cudaStream_t stream) {
    if (n_tokens <= 0) return status::ok();
    if (src_stride < kv_dim || n_tokens > 0x7fffffff)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "kv_store_f16: src_stride {} < kv_dim {} or n_tokens {}", src_stride, kv_dim, n_tokens);
    kv_store_kernel<<<unsigned(n_tokens), 128, 0, stream>>>(k, v, src_stride, cache_k, cache_v, pos_dev, kv_dim, n_ctx);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
