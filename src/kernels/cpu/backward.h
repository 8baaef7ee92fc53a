// Backward passes of the decoder layer's ops for LoRA fine-tuning (issue 21 Part 2, docs/lora.md
// "Fine-tuning"): given the forward op's inputs and dL/d(output), dL/d(input). Frozen weights get
// no gradient (norm weights, linears); only LoRA's A and B train (model/llama_train.cpp).
// Each function mirrors its forward kernel (norm.h, activation.h, attention.h) and, like them,
// takes raw pointers and sizes. The tests check them against finite differences and a
// double-precision reference (tests/ops/test_backward_ops.cpp).
#pragma once

#include <cstdint>

#include "kernels/cpu/attention.h"

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

// y = w * x / sqrt(mean(x^2) + eps) per row (rms_norm). With r = 1/sqrt(mean(x^2) + eps) and
// g = w * dy: dx = r * g - x * r^3 * mean(g * x). x, dy, dx: [n_rows, dim]; dx may alias dy.
// Row sums in double.
void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int64_t n_rows, int64_t dim,
                       float eps, thread_pool* pool);

// y = silu(gate) * up (silu_mul): dup = dy * silu(gate), dgate = dy * up * s * (1 + gate * (1 - s)),
// s = sigmoid(gate). All [n]; element by element, so dgate may alias gate or dy and dup up or dy
// (not each other).
void silu_mul_backward(const float* gate, const float* up, const float* dy, float* dgate, float* dup, int64_t n,
                       thread_pool* pool);

// Causal GQA attention (attention.h, same shape contract; softcap must be 0): given q, k, v and
// dout [n_q, out_stride], writes dq [n_q, q_stride] and dk, dv [n_kv, kv_stride] (the head
// columns; dk/dv of every key 0..n_kv-1, zero where no query sees it). With P = softmax(S),
// S = scale * q k^T over the visible keys:
//   dv = P^T dout,  dP = dout v^T,  dS = P * (dP - rowsum(P * dP)),  dq = scale dS k,  dk = scale dS^T q,
// summed over the query heads that share a key/value head. Reference: double, plain loops.
void attention_backward_ref(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                            float* dv, const attention_shape& s);
// Same contract. One work item per query head: scores, dP and dS over all its queries' visible
// keys with single-threaded sgemms, its dk/dv into a private buffer; the buffers are then summed
// per key/value head in head order (deterministic for a given shape and thread count).
void attention_backward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                        float* dv, const attention_shape& s, thread_pool* pool);

}  // namespace gptq::cpu
