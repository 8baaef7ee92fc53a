// KV-cache append on device memory: the new rows of keys and values copied into the cache at a
// position read from device memory, so that a captured CUDA graph (the decode step) writes to the
// right row on every replay without being captured again.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// cache_k[pos + t, :] = k[t, :] and cache_v[pos + t, :] = v[t, :] for t < n_tokens, where pos is
// the device I32 *pos_dev (rows at or past n_ctx are not written). k, v: [n_tokens, src_stride] F16;
// cache_k, cache_v: [n_ctx, kv_dim] F16 contiguous.
status kv_store_f16(const uint16_t* k, const uint16_t* v, int64_t src_stride, uint16_t* cache_k, uint16_t* cache_v,
                    const int32_t* pos_dev, int64_t n_tokens, int64_t kv_dim, int64_t n_ctx, cudaStream_t stream);

}  // namespace gptq::cuda
