// Embedding gather: one block per token, 16-byte copies when the row allows it.
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.cuh"

namespace gptq::cuda {

namespace {

__global__ void embedding_kernel(const uint16_t* table, const int32_t* ids, uint16_t* out, int64_t vocab, int64_t dim,
                                 int64_t out_stride, bool vec, float scale) {
    const int32_t id  = ids[blockIdx.x];
    uint16_t*     dst = out + blockIdx.x * out_stride;
    if (id < 0 || id >= vocab) {
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = 0;
        return;
    }
    const uint16_t* src = table + int64_t(id) * dim;
    if (scale != 1.0f) {  // Gemma: the row times sqrt(hidden) in F32, rounded once
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
            dst[i] = __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(src[i])) * scale));
    } else if (vec) {  // dim % 8 == 0 and both rows 16-byte aligned
        for (int64_t i = threadIdx.x; i < dim / 8; i += blockDim.x)
            reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    } else {
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
    }
}

}  // namespace

status embedding_f16(const uint16_t* table, const int32_t* ids, uint16_t* out, int64_t n_tokens, int64_t vocab,
                     int64_t dim, int64_t out_stride, cudaStream_t stream, float scale) {
    if (n_tokens <= 0 || dim <= 0) return status::ok();
    const bool vec = dim % 8 == 0 && out_stride % 8 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
    embedding_kernel<<<unsigned(n_tokens), 128, 0, stream>>>(table, ids, out, vocab, dim, out_stride, vec, scale);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
