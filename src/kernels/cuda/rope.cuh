// Rotary position embedding on device memory, same contract as kernels/cpu/rope.h (Hugging Face
// rotate_half pairing i <-> i + head_dim/2, cos/sin tables made by the caller), F16 activations.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "kernels/cuda/kv_pages.cuh"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// x: [n_tokens, row_stride] F16, the first n_heads * head_dim values of each row are the heads
// ([n_heads, head_dim]); rotated in place. cos, sin: [n_tokens, head_dim / 2] F32. head_dim even.
status rope_f16(uint16_t* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, cudaStream_t stream);

// The attention's RoPE and KV-cache append in one launch: q rotated in place; token t's k rotated
// into row pos_dev[t] of sequence seq_dev[t] and v copied there (pos_dev, seq_dev: device I32 per
// token, read when the kernel runs; seq_dev nullptr: every token in sequence 0, i.e. the table row
// pages.pages points at; rows outside [0, n_ctx) and rows whose page table entry is negative are
// not written). The row's place in cache_k / cache_v is given by the page map (kv_pages.cuh:
// cache_k/v are the page pool [n_pages][page_size][kv_dim]; a null map: [n_ctx, kv_dim]
// contiguous, one sequence). k and v themselves are left as they are. Bit for bit rope_f16 on q
// and k, then kv_store_f16 into the addressed rows. q: [n_tokens, q_stride] ([n_head, head_dim]
// first), k and v: [n_tokens, kv_stride] ([n_head_kv, head_dim]); kv_dim = n_head_kv * head_dim.
status rope_kv_store_f16(uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t q_stride, int64_t kv_stride,
                         const float* cos, const float* sin, int64_t n_tokens, int64_t n_head, int64_t n_head_kv,
                         int64_t head_dim, uint16_t* cache_k, uint16_t* cache_v, const int32_t* pos_dev,
                         const int32_t* seq_dev, const kv_page_map& pages, int64_t n_ctx, cudaStream_t stream);

}  // namespace gptq::cuda
