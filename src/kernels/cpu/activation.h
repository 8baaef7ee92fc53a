// Element-wise and row-wise activations: SwiGLU's silu(gate) * up, softmax, log-softmax.
// All in F32; the references accumulate in double where a sum is involved.
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// gate, up, y: [n] (y may alias gate or up). y = gate * sigmoid(gate) * up.
void silu_mul_ref(const float* gate, const float* up, float* y, int64_t n);
void silu_mul(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool);

// x, y: [n_rows, n_cols] row-major (y may alias x). Softmax over each row.
void softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols);
void softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool);

// x, y: [n_rows, n_cols] row-major (y may alias x). y = x - logsumexp(row).
void log_softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols);
void log_softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool);

}  // namespace gptq::cpu
