// ops: what the model's forward pass calls. One function per operation, F32 tensors as raw
// pointers with their shapes; the context says how to run them (threads, reference kernels).
//
// Shapes follow PyTorch: activations [n_tokens, features] row-major, linear weights
// [n_out, n_in] row-major. Callers pass consistent shapes; a mismatch is a bug (GPTQ_ASSERT).
#pragma once

#include <cstdint>

namespace gptq {

class thread_pool;

struct ops_context {
    thread_pool* pool      = nullptr;  // nullptr: run on the calling thread
    bool         reference = false;    // use the plain reference kernels (slow; for checking)
    // GPTQ linears round their activations to int8 (one scale per block of up to 128 rows of a
    // group; kernels/cpu/gptq_linear.h) and decode-sized calls (m < 4 rows) use the int8 GEMV:
    // much faster, not F32-exact. Generation turns it on; perplexity and calibration keep the F32
    // products (docs/model-runtime.md). It also selects SwiGLU's vector exp (op_silu_mul).
    bool int8_activations = false;
};

// y[m, n] = x[m, k] w[n, k]^T + bias[n] (bias may be nullptr). y must not alias x.
void op_linear(const ops_context& ctx, const float* x, const float* w, const float* bias, float* y, int64_t m,
               int64_t n, int64_t k);

// The same with w in F16 bits [n, k] (weights kept F16 in memory; kernels/cpu/linear.h linear_f16).
void op_linear_f16(const ops_context& ctx, const float* x, const uint16_t* w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k);

// Several F16 linears of one input x [m, k] (q/k/v, gate/up): ys[j] = x W_j^T + biases[j], each
// exactly op_linear_f16's result for it alone, in one pool dispatch. At most 8.
struct linear_f16_out {
    const uint16_t* w    = nullptr;  // [n, k]
    const float*    bias = nullptr;  // [n] or nullptr
    float*          y    = nullptr;  // [m, n]
    int64_t         n    = 0;
};
void op_linears_f16(const ops_context& ctx, const float* x, const linear_f16_out* outs, int n_outs, int64_t m,
                    int64_t k);

// y[n_rows, dim] = rmsnorm(x[n_rows, dim]) * w[dim]; y may alias x.
void op_rms_norm(const ops_context& ctx, const float* x, const float* w, float* y, int64_t n_rows, int64_t dim,
                 float eps);

// cos, sin: [n_tokens, half] for tokens at positions pos0 .. pos0 + n_tokens - 1, with
// angle = float(pos) * inv_freq[i] in F32 (as transformers computes it), times `scaling`
// (the RoPE variant's attention scaling; 1 for default/linear/dynamic/llama3).
void op_rope_tables(const float* inv_freq, int64_t half, int64_t pos0, int64_t n_tokens, float scaling, float* cos,
                    float* sin);

// Rotate the heads of x [n_tokens, row_stride] in place (see kernels/cpu/rope.h).
void op_rope(const ops_context& ctx, float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads,
             int64_t head_dim, int64_t row_stride);

struct attention_args {
    const float* q = nullptr;  // [n_q, q_stride], heads [n_head, head_dim] first in each row
    const float* k = nullptr;  // [n_kv, kv_stride], heads [n_head_kv, head_dim]
    const float* v = nullptr;  // [n_kv, kv_stride]
    // Keys and values as F16 bits instead (an F16 KV cache; k and v unused): [n_kv, kv_stride].
    const uint16_t* k16 = nullptr;
    const uint16_t* v16 = nullptr;
    float*          out = nullptr;  // [n_q, out_stride]
    int64_t         n_q = 0, n_kv = 0, q_pos0 = 0;
    int64_t         n_head = 0, n_head_kv = 0, head_dim = 0;
    int64_t         window   = 0;  // sliding window (0: none)
    float           scale    = 1.0f;
    float           softcap  = 0.0f;  // scaled scores s -> softcap * tanh(s / softcap) (Gemma 2); 0 = off
    int64_t         q_stride = 0, kv_stride = 0, out_stride = 0;
};
// Causal GQA attention of the queries at positions q_pos0.. over keys 0..n_kv-1 (see
// kernels/cpu/attention.h); with softcap 0 the result is bit-identical to the op without the option.
// With k16/v16 the F16 kernels run (attention_f16: F16C in the decode rows).
void op_attention(const ops_context& ctx, const attention_args& a);

// y[n] = silu(gate[n]) * up[n]; y may alias gate or up.
void op_silu_mul(const ops_context& ctx, const float* gate, const float* up, float* y, int64_t n);

// y[n] = gelu_tanh(gate[n]) * up[n] (GeGLU with transformers' gelu_pytorch_tanh); y may alias gate or up.
void op_gelu_tanh_mul(const ops_context& ctx, const float* gate, const float* up, float* y, int64_t n);

// x[n] = cap * tanh(x[n] / cap) in place, cap > 0 (final logit soft-capping).
void op_softcap(const ops_context& ctx, float* x, int64_t n, float cap);

// x[n] += y[n].
void op_add(const ops_context& ctx, float* x, const float* y, int64_t n);

// y[n_rows, n_cols] = log_softmax(x) per row; y may alias x.
void op_log_softmax(const ops_context& ctx, const float* x, float* y, int64_t n_rows, int64_t n_cols);

}  // namespace gptq
