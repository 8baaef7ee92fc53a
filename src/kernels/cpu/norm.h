// RMSNorm as Llama defines it: y = w * x / sqrt(mean(x^2) + eps), per row, in F32.
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// x: [n_rows, dim] row-major; w: [dim]; y: [n_rows, dim] (may alias x).
void rms_norm_ref(const float* x, const float* w, float* y, int64_t n_rows, int64_t dim, float eps);
// Same contract; rows over the pool, 8 independent partial sums per row so the loop vectorises.
void rms_norm(const float* x, const float* w, float* y, int64_t n_rows, int64_t dim, float eps, thread_pool* pool);

}  // namespace gptq::cpu
