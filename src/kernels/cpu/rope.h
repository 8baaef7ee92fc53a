// Rotary position embedding, Hugging Face "rotate_half" convention: within each head of
// head_dim values, element i pairs with element i + head_dim/2 (not with i+1 as in GPT-J/Meta).
//   y[i]        = x[i] * cos[t][i] - x[i + half] * sin[t][i]
//   y[i + half] = x[i + half] * cos[t][i] + x[i] * sin[t][i]        for i < half
// cos/sin come from the caller (ops builds them from positions and inverse frequencies), so
// every RoPE scaling variant is the same kernel.
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// x: [n_tokens, row_stride] row-major, of which the first n_heads * head_dim values are the heads
// ([n_heads, head_dim]); rotated in place. cos, sin: [n_tokens, head_dim / 2]. head_dim is even.
void rope_ref(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
              int64_t row_stride);
// Same contract; tokens over the pool.
void rope(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
          int64_t row_stride, thread_pool* pool);

}  // namespace gptq::cpu
