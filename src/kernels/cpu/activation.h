// Element-wise and row-wise activations: SwiGLU's silu(gate) * up, GeGLU's gelu_tanh(gate) * up,
// tanh soft-capping, softmax, log-softmax.
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
// The same with e^-g in vectors (vec_exp.h: a few ulps, where silu_mul calls libm's expf per
// element): generation's path (op_silu_mul with ctx.int8_activations); perplexity and calibration
// keep silu_mul.
void silu_mul_fast(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool);

// gate, up, y: [n] (y may alias gate or up). y = gelu_tanh(gate) * up with the tanh approximation
// transformers' gelu_pytorch_tanh (torch.nn.functional.gelu(approximate="tanh")) computes:
// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). The fast version evaluates it
// in F32 in torch's order (x_cube = x * x * x, inner = beta * (x + kappa * x_cube)).
void gelu_tanh_mul_ref(const float* gate, const float* up, float* y, int64_t n);
void gelu_tanh_mul(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool);

// x: [n] in place, cap > 0: x = cap * tanh(x / cap) (Gemma 2's attention and final logit
// soft-capping, as transformers writes it: a division, tanh, a multiplication).
void softcap_ref(float* x, int64_t n, float cap);
void softcap(float* x, int64_t n, float cap, thread_pool* pool);

// x, y: [n_rows, n_cols] row-major (y may alias x). Softmax over each row.
void softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols);
void softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool);

// x, y: [n_rows, n_cols] row-major (y may alias x). y = x - logsumexp(row).
void log_softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols);
void log_softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool);

}  // namespace gptq::cpu
