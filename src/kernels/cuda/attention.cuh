// Causal grouped-query attention on device memory, same function as kernels/cpu/attention.h
// (positions, GQA head mapping, sliding window counting the query itself), F16 q/k/v/out and F32
// arithmetic. Two kernels: prefill (tiles of queries against tiles of keys with an online
// softmax, no [n_q x n_kv] matrix anywhere) and decode (few queries against a long KV cache,
// the keys split over blocks, partial results merged by a second small kernel).
#pragma once

#include <cstdint>

#include "core/status.h"
#include "kernels/cuda/kv_pages.cuh"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

struct attention_params {
    const uint16_t* q   = nullptr;  // [n_q, q_stride] F16, heads [n_head, head_dim] first in each row
    const uint16_t* k   = nullptr;  // [n_kv, kv_stride] F16, heads [n_head_kv, head_dim] (paged: the pool's rows)
    const uint16_t* v   = nullptr;  // [n_kv, kv_stride] F16 (paged: the pool's rows)
    uint16_t*       out = nullptr;  // [n_q, out_stride] F16, heads [n_head, head_dim]; no alias with q/k/v
    int64_t         n_q = 0, n_kv = 0, q_pos0 = 0;            // query i at position q_pos0 + i; q_pos0 + n_q <= n_kv
    int64_t         n_head = 0, n_head_kv = 0, head_dim = 0;  // n_head_kv divides n_head; head_dim even, <= 256
    int64_t         window   = 0;                             // sliding window in tokens (0: none)
    float           scale    = 1.0f;
    float           softcap  = 0.0f;  // > 0: scaled scores s -> softcap * tanh(s / softcap) (Gemma 2); 0 = off
    int64_t         q_stride = 0, kv_stride = 0, out_stride = 0;  // row strides in elements
    // Paged keys and values (kv_pages.cuh): k and v are then the page pool and row j of a sequence
    // is addressed through its page table (kv_pages.pages: the sequence's table row, or with
    // q_seq_dev the tables of every sequence). Null map: rows j of k and v one after another.
    kv_page_map kv_pages;
    // Decode only, ragged: when set, query i is at position q_pos_dev[i] (device I32, read when the
    // kernel runs) of sequence q_seq_dev[i] (device I32, needs kv_pages; nullptr: sequence 0); it
    // attends to that sequence's positions 0 .. q_pos_dev[i] (the window applies). n_kv is then the
    // bound of every position + 1, which sizes the grid and the workspace; q_pos0 is unused. A
    // captured CUDA graph so replays the decode step of any sequences at any positions (continuous
    // batching).
    const int32_t* q_pos_dev = nullptr;
    const int32_t* q_seq_dev = nullptr;
    // Decode only: column c (< n_head * head_dim) of a query's output goes to column out_col[c] of its
    // row (device I32; the act-order column order of the linear that reads the output: the inverse of
    // its permutation); nullptr: column c.
    const int32_t* out_col = nullptr;
    // Decode only: RoPE and the KV-cache append done here, rope_kv_store_f16 not run before. q holds the
    // unrotated queries; query i's own key and value (at its position: q_pos0 + i, or q_pos_dev[i]) are
    // row i of k_new / v_new (stride new_stride, heads as in k; unrotated), which the kernel rotates
    // with row i of rope_cos / rope_sin ([n_q, head_dim / 2] F32) where a query needs that key, and
    // stores into the cache (k, v: the pool, written through the page map) when the position is below
    // n_ctx and its page exists: the same bits as rope_kv_store_f16 then this kernel. k_new nullptr: off.
    const uint16_t* k_new      = nullptr;
    const uint16_t* v_new      = nullptr;
    int64_t         new_stride = 0;
    const float*    rope_cos   = nullptr;
    const float*    rope_sin   = nullptr;
    int64_t         n_ctx      = 0;
};

// Checks the shape (returns INVALID_ARGUMENT naming the field) and runs the prefill kernel: the
// tensor-core one for head_dim 64 or 128 with n_q >= 64 and even strides, the CUDA-core one otherwise.
status attention_prefill_f16(const attention_params& p, cudaStream_t stream);
// Tests and benchmarks: route every prefill to the CUDA-core kernel (process-wide, not thread-safe).
void attention_prefill_force_cuda_cores(bool on);

// F32 workspace the decode kernel needs for these sizes (a few KB).
int64_t attention_decode_workspace_floats(int64_t n_q, int64_t n_kv, int64_t n_head, int64_t head_dim);
// Decode: best for n_q small (1..16) and n_kv large. workspace: device F32 buffer of at least
// attention_decode_workspace_floats(...) values. counters: nullptr, a second kernel merges the key
// chunks; else a device array of attention_decode_counters(n_q, n_head) zeros (left zero), and the
// last block of each (query, head) merges them in the same order: one launch, the same bits.
status  attention_decode_f16(const attention_params& p, float* workspace, int64_t workspace_floats, cudaStream_t stream,
                             unsigned* counters = nullptr);
int64_t attention_decode_counters(int64_t n_q, int64_t n_head);

}  // namespace gptq::cuda
