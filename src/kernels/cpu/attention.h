// Causal grouped-query attention over a key/value cache, optionally with a sliding window.
//
// Query i sits at position q_pos0 + i; key/value j at position j. Query i sees key j when
// j <= q_pos0 + i and, with window > 0, q_pos0 + i - j < window (the window counts the query
// itself, as transformers' sliding-window mask does). Query head h reads key/value head
// h / (n_head / n_head_kv). out = softmax(scale * q k^T over visible keys) v, in F32. With
// softcap > 0 the scaled scores are soft-capped first, s = softcap * tanh(s / softcap) (Gemma 2's
// attn_logit_softcapping); softcap 0 leaves the computation exactly as without the option.
#pragma once

#include <cstdint>

#include "kernels/cpu/f16_isa.h"

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

struct attention_shape {
    int64_t n_q       = 0;  // query tokens
    int64_t n_kv      = 0;  // key/value tokens held (positions 0..n_kv-1); q_pos0 + n_q <= n_kv
    int64_t q_pos0    = 0;  // position of query 0
    int64_t n_head    = 0;
    int64_t n_head_kv = 0;  // divides n_head
    int64_t head_dim  = 0;
    int64_t window    = 0;  // sliding window in tokens; 0 = none
    float   scale     = 1.0f;
    float   softcap   = 0.0f;  // attention logit soft-capping; 0 = off
    // Row strides in floats: q [n_q, q_stride], k/v [n_kv, kv_stride], out [n_q, out_stride]; the
    // heads are the first n_head(_kv) * head_dim values of each row, [n_head, head_dim].
    int64_t q_stride   = 0;
    int64_t kv_stride  = 0;
    int64_t out_stride = 0;
};

// q: [n_q, q_stride]; k, v: [n_kv, kv_stride]; out: [n_q, out_stride] (no alias with q/k/v).
void attention_ref(const float* q, const float* k, const float* v, float* out, const attention_shape& s);
// Same contract. Work items are (head, block of 32 queries); each runs two single-threaded sgemms
// over just the keys its block can see, then a row softmax.
void attention_blas(const float* q, const float* k, const float* v, float* out, const attention_shape& s,
                    thread_pool* pool);

// The same with keys and values held as F16 bits (an F16 KV cache): k, v [n_kv, kv_stride] uint16.
// The reference converts them to F32 (exact) and runs attention_ref.
void attention_f16_ref(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s);
// Work items are (key/value head, block of 32 queries), the group's query heads together. A block
// of one query (decode) converts K and V in registers (F16C on AVX-512F or AVX2, portable C++
// otherwise; isa must be supported): per key one dot product for each query head of the group,
// softmax, then the weighted sum of the values with head_dim F32 accumulators in registers; each
// K/V row is read once for the group. Larger blocks convert the keys/values they see to F32 once
// and run attention_blas's two sgemms per query head.
void attention_f16(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s,
                   thread_pool* pool, f16_isa isa);
void attention_f16(const float* q, const uint16_t* k, const uint16_t* v, float* out, const attention_shape& s,
                   thread_pool* pool);  // f16_best_isa()

}  // namespace gptq::cpu
