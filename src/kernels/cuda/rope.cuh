// Rotary position embedding on device memory, same contract as kernels/cpu/rope.h (Hugging Face
// rotate_half pairing i <-> i + head_dim/2, cos/sin tables made by the caller), F16 activations.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// x: [n_tokens, row_stride] F16, the first n_heads * head_dim values of each row are the heads
// ([n_heads, head_dim]); rotated in place. cos, sin: [n_tokens, head_dim / 2] F32. head_dim even.
status rope_f16(uint16_t* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, cudaStream_t stream);

// The attention's RoPE and KV-cache append in one launch: q rotated in place; k rotated into
// cache_k[pos + t] and v copied into cache_v[pos + t] (pos = *pos_dev, read when the kernel runs;
// rows at or past n_ctx are not written), k and v themselves left as they are. Bit for bit rope_f16
// on q and k, then kv_store_f16. q: [n_tokens, q_stride] ([n_head, head_dim] first), k and v:
// [n_tokens, kv_stride] ([n_head_kv, head_dim]); caches [n_ctx, n_head_kv * head_dim] contiguous.
// Batched decode (tokens = sequences in lockstep): token t goes to row pos + t * tok_pos_step of the
// cache starting tok_cache_stride * t elements further (1 and 0: one sequence; 0 and n_ctx * kv_dim:
// one token per sequence, all at pos).
status rope_kv_store_f16(uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t q_stride, int64_t kv_stride,
                         const float* cos, const float* sin, int64_t n_tokens, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, uint16_t* cache_k, uint16_t* cache_v, const int32_t* pos_dev, int64_t n_ctx,
                         cudaStream_t stream, int64_t tok_pos_step = 1, int64_t tok_cache_stride = 0);

}  // namespace gptq::cuda
