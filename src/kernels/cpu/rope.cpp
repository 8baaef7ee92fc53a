#include "kernels/cpu/rope.h"

#include "core/thread_pool.h"

namespace gptq::cpu {

void rope_ref(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
              int64_t row_stride) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + t * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float c = cos[t * half + i], s = sin[t * half + i];
                const float a = v[i], b = v[i + half];
                v[i]        = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

namespace {
void rope_tokens(float* x, const float* cos, const float* sin, int64_t t0, int64_t t1, int64_t n_heads,
                 int64_t head_dim, int64_t row_stride) {
    const int64_t half = head_dim / 2;
    for (int64_t t = t0; t < t1; ++t) {
        const float* __restrict c = cos + t * half;
        const float* __restrict s = sin + t * half;
        for (int64_t h = 0; h < n_heads; ++h) {
            float* __restrict lo = x + t * row_stride + h * head_dim;
            float* __restrict hi = lo + half;
            for (int64_t i = 0; i < half; ++i) {  // independent lanes: vectorises
                const float a = lo[i], b = hi[i];
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
    }
}
}  // namespace

void rope(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
          int64_t row_stride, thread_pool* pool) {
    if (!pool || n_tokens < 8) {
        rope_tokens(x, cos, sin, 0, n_tokens, n_heads, head_dim, row_stride);
        return;
    }
    pool->parallel_for(
        n_tokens, [&](int64_t t0, int64_t t1) { rope_tokens(x, cos, sin, t0, t1, n_heads, head_dim, row_stride); });
}

}  // namespace gptq::cpu
