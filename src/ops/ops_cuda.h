// ops on the GPU (built with GPTQ_CUDA only): a context (device, stream, cuBLAS handle,
// scratch), device buffers, and one function per operation over F16 device tensors. This file
// and ops_cuda.cpp are the only callers of kernels/cuda; the model's forward pass will be written
// against these (docs/cuda.md lists what is left for that). Shapes follow ops.h: activations
// [n_tokens, features] row-major, linear weights [n_out, n_in]. The CPU ops in ops.h are unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"

typedef struct CUstream_st*   cudaStream_t;
typedef struct cublasContext* cublasHandle_t;

namespace gptq {

// Device memory, freed with the object; movable, not copyable.
class cuda_buffer {
public:
    cuda_buffer() = default;
    ~cuda_buffer();
    cuda_buffer(cuda_buffer&& o) noexcept;
    cuda_buffer& operator=(cuda_buffer&& o) noexcept;
    cuda_buffer(const cuda_buffer&)            = delete;
    cuda_buffer& operator=(const cuda_buffer&) = delete;

    static result<cuda_buffer> alloc(size_t bytes);                       // OUT_OF_MEMORY names the size
    static result<cuda_buffer> from_host(const void* src, size_t bytes);  // alloc + synchronous copy
    // A view of memory owned elsewhere (a part of another buffer): not freed with the object.
    static cuda_buffer borrow(void* p, size_t bytes);
    status             upload(const void* src, size_t bytes, size_t offset = 0);
    status             download(void* dst, size_t bytes, size_t offset = 0) const;

    void*  data() const { return p_; }
    size_t bytes() const { return n_; }
    template <typename T>
    T* as() const {
        return static_cast<T*>(p_);
    }

private:
    void*  p_     = nullptr;
    size_t n_     = 0;
    bool   owned_ = true;
};

struct cuda_context_state;

// One device, one stream, one cuBLAS handle, a scratch area. Not thread-safe: one per thread.
class cuda_context {
public:
    static result<std::unique_ptr<cuda_context>> create(int device);
    ~cuda_context();

    int            device() const;
    int            sm_version() const;  // 10 * major + minor
    cudaStream_t   stream() const;
    cublasHandle_t blas() const;
    status         synchronize() const;
    // Scratch of at least `bytes` (grown, never shrunk; reallocating invalidates earlier
    // pointers, so size it before capturing a CUDA graph).
    result<void*> scratch(size_t bytes);
    // A second area, zero when (re)allocated, for kernels that leave it zero after use (the int4
    // GEMV's split-K counters). Same growth rule as scratch.
    result<void*> zeroed_workspace(size_t bytes);
    // k_context_counters unsigned zeros on the device, allocated with the context and never moved
    // (safe in captured graphs), for one kernel at a time that leaves them zero (the decode
    // attention's chunk counters); nullptr when n exceeds them.
    static constexpr int64_t k_context_counters = 65536;
    unsigned*                counters(int64_t n);

    // Two F16 weight slots for dequantize + cuBLAS and a side stream that fills one ahead
    // (op_cuda_gptq_linear, op_cuda_gptq_dequant_ahead; docs/cuda.md "Prefill: the next linear
    // dequantized ahead"). A key names a linear's weights (its device pointer) for one pass only.
    struct dequant_slot {
        uint16_t* w      = nullptr;
        bool      filled = false;  // dequantized ahead (the stream waits for it); false: the caller fills it
    };
    // The slot dequantized ahead for `key`, or a slot of at least `bytes` for the caller to fill on
    // the stream. Until dequant_release(key) the slot is the caller's.
    result<dequant_slot> dequant_take(const void* key, size_t bytes);
    // After the ops that read the slot of `key` are queued: it is free again once they have run.
    status dequant_release(const void* key);
    // Queues fill(side stream, slot) for `key` into the slot not in use, unless one holds it already.
    // Skipped (ok) while capturing, when both slots hold unconsumed work, or when the slot cannot grow.
    status dequant_ahead(const void* key, size_t bytes, status (*fill)(const void* arg, cudaStream_t, uint16_t*),
                         const void* arg);
    // Forgets what was queued ahead and not taken (the start of a pass: keys are only valid within one).
    void dequant_forget();

private:
    cuda_context() = default;
    std::unique_ptr<cuda_context_state> s_;
};

// Free and total memory of the context's device (cudaMemGetInfo), for messages and reports.
struct cuda_memory_info {
    size_t free = 0, total = 0;
};
result<cuda_memory_info> cuda_memory_info_get(const cuda_context& ctx);

// Copies ordered on the context's stream (the stream is non-blocking, so plain cudaMemcpy on the
// legacy stream would not wait for it). The host->device one returns before the copy has run.
status cuda_copy_to_device_async(cuda_context& ctx, void* dst, const void* src, size_t bytes);
status cuda_copy_to_host(cuda_context& ctx, void* dst, const void* src, size_t bytes);       // waits for the stream
status cuda_copy_device_async(cuda_context& ctx, void* dst, const void* src, size_t bytes);  // device to device
status cuda_zero_async(cuda_context& ctx, void* dst, size_t bytes);                          // memset 0

// A CUDA graph captured from the context's stream: capture_begin, then the ops (queued, not run),
// then capture_end instantiates them; launch replays them on the stream. Kernel arguments are
// frozen at capture, so anything that changes between replays must be read from device memory.
// Nothing may allocate during capture: size the context's scratch beforehand.
class cuda_graph {
public:
    cuda_graph() = default;
    ~cuda_graph();
    cuda_graph(cuda_graph&& o) noexcept;
    cuda_graph& operator=(cuda_graph&& o) noexcept;
    cuda_graph(const cuda_graph&)            = delete;
    cuda_graph& operator=(const cuda_graph&) = delete;

    static status capture_begin(cuda_context& ctx);
    // Ends the capture begun on ctx; `captured_ok` false (an op failed while capturing) discards it.
    static result<cuda_graph> capture_end(cuda_context& ctx, bool captured_ok = true);
    status                    launch(cuda_context& ctx) const;
    bool                      empty() const { return exec_ == nullptr; }

private:
    void* graph_ = nullptr;  // cudaGraph_t
    void* exec_  = nullptr;  // cudaGraphExec_t
};

// ---- CPU offload: pinned host memory, a second stream, events ------------------------------------
// (model/llama_cuda.cpp: offloaded modules live in pinned host memory and are copied into a device
// staging buffer on a copy stream while the context's stream computes; events order the two.)

// Page-locked host memory (cudaHostAlloc), freed with the object. Copies from it are asynchronous
// and can be captured into a CUDA graph (the pages do not move).
class cuda_host_buffer {
public:
    cuda_host_buffer() = default;
    ~cuda_host_buffer();
    cuda_host_buffer(cuda_host_buffer&& o) noexcept;
    cuda_host_buffer& operator=(cuda_host_buffer&& o) noexcept;
    cuda_host_buffer(const cuda_host_buffer&)            = delete;
    cuda_host_buffer& operator=(const cuda_host_buffer&) = delete;

    static result<cuda_host_buffer> alloc(size_t bytes);  // OUT_OF_MEMORY names the size

    void*  data() const { return p_; }
    size_t bytes() const { return n_; }
    template <typename T>
    T* as() const {
        return static_cast<T*>(p_);
    }

private:
    void*  p_ = nullptr;
    size_t n_ = 0;
};

// A second non-blocking stream on a context's device; destroyed (after finishing its work) with the object.
class cuda_stream {
public:
    cuda_stream() = default;
    ~cuda_stream();
    cuda_stream(cuda_stream&& o) noexcept;
    cuda_stream& operator=(cuda_stream&& o) noexcept;
    cuda_stream(const cuda_stream&)            = delete;
    cuda_stream& operator=(const cuda_stream&) = delete;

    static result<cuda_stream> create(const cuda_context& ctx);
    cudaStream_t               get() const { return s_; }
    status                     synchronize() const;

private:
    cudaStream_t s_ = nullptr;
};

// An event without timing, for ordering streams: record() on one stream, wait_on() by another (both
// are captured into a CUDA graph as dependencies when the streams are capturing: the fork/join of
// a multi-stream capture).
class cuda_event {
public:
    cuda_event() = default;
    ~cuda_event();
    cuda_event(cuda_event&& o) noexcept;
    cuda_event& operator=(cuda_event&& o) noexcept;
    cuda_event(const cuda_event&)            = delete;
    cuda_event& operator=(const cuda_event&) = delete;

    static result<cuda_event> create();
    // With timing (elapsed_seconds; not for graph capture's ordering, which create() is for).
    static result<cuda_event> create_timing();
    status                    record(cudaStream_t s) const;
    status                    wait_on(cudaStream_t s) const;  // work queued on s after this waits for the record
    // Seconds between two recorded timing events (waits for `end`).
    static result<double> elapsed_seconds(const cuda_event& start, const cuda_event& end);

private:
    void* e_ = nullptr;  // cudaEvent_t
};

// Host -> device copy queued on stream s (the host memory pinned for it to be asynchronous).
status cuda_copy_to_device_on(cudaStream_t s, void* dst, const void* src, size_t bytes);

// ---- element-wise and normalisation (F16 device pointers) ----------------------------------
status op_cuda_rms_norm(cuda_context& ctx, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_rows,
                        int64_t dim, float eps);
// cos/sin: [n_tokens, head_dim / 2] F32 device tables (ops.h op_rope_tables, uploaded).
status op_cuda_rope(cuda_context& ctx, uint16_t* x, const float* cos, const float* sin, int64_t n_tokens,
                    int64_t n_heads, int64_t head_dim, int64_t row_stride);
// y[r, :n] = silu(gate[r, :n]) * up[r, :n]; gate/up/y with row strides (fused gate_up: up = gate + n).
// perm ([n] I32 device, act-order order of the GPTQ layer reading y, see cuda_gptq_linear::perm):
// y[r, i] = silu(gate[r, perm[i]]) * up[r, perm[i]], y then must not alias gate or up.
// block > 0: gate and up interleaved in blocks of `block` features (kernels/cuda/activation.cuh; the
// fused decode layout of a gate/up projection): pass up = gate + block.
status op_cuda_silu_mul(cuda_context& ctx, const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows,
                        int64_t n, int64_t gate_stride, int64_t up_stride, int64_t y_stride,
                        const int32_t* perm = nullptr, int64_t block = 0);
// The same with GELU (tanh approximation) for SiLU: GeGLU (Gemma), F32 math, F16 in and out.
status op_cuda_gelu_tanh_mul(cuda_context& ctx, const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows,
                             int64_t n, int64_t gate_stride, int64_t up_stride, int64_t y_stride,
                             const int32_t* perm = nullptr, int64_t block = 0);
// x[i] = cap * tanh(x[i] / cap), F32 in place (final logit soft-capping); cap > 0.
status op_cuda_softcap(cuda_context& ctx, float* x, int64_t n, float cap);
// Each row's k most likely tokens and softmax normalisers (ops/logits_top.h; kernels/cuda/
// logits_top.cuh): logits [rows, n_vocab] F32, inv_temp [rows] or nullptr; ids, vals [rows, k],
// sums [rows, 2] (sum_exp, sum_exp_t); all device pointers, 1 <= k <= min(n_vocab, 256).
status op_cuda_logits_top(cuda_context& ctx, const float* logits, int64_t rows, int64_t n_vocab, int64_t k,
                          const float* inv_temp, int32_t* ids, float* vals, double* sums);
// The decode step's residual add + RMSNorm in one launch: h[r] += add[r] (add nullptr: none), then
// y[r, i] = rms_norm(h[r])[perm ? perm[i] : i]; h, add: [n_rows, dim], y: [n_rows, dim], w: [dim];
// bit for bit op_cuda_add then op_cuda_rms_norm (then the permutation). y must not alias h or add.
status op_cuda_add_rms_norm(cuda_context& ctx, uint16_t* h, const uint16_t* add, const uint16_t* w, uint16_t* y,
                            int64_t n_rows, int64_t dim, float eps, const int32_t* perm = nullptr);
// A paged KV cache's page tables (kernels/cuda/kv_pages.cuh, docs/cuda.md "KV pages"): row r of
// sequence s is pool row pages[s * pages_stride + r / page_size] * page_size + r % page_size.
// pages nullptr: contiguous rows (row r at r).
struct cuda_kv_pages {
    const int32_t* pages        = nullptr;  // device I32 [n_seq][pages_stride], or one sequence's row
    int64_t        page_size    = 0;        // a power of two
    int64_t        pages_stride = 0;
};
// RoPE of q (in place) and of k into the KV cache, v into the cache, in one launch (rope.cuh
// rope_kv_store_f16): bit for bit op_cuda_rope on q and k, then op_cuda_kv_store_strided into the
// addressed rows, except that k itself is not rotated. q: [n_tokens, q_stride], k/v: [n_tokens,
// kv_stride]. Token t goes to position pos_dev[t] of sequence seq_dev[t] (nullptr: sequence 0 of
// `pages`) through the page map; cache_k/v: the page pool (or [n_ctx, kv_dim] with a null map).
status op_cuda_rope_kv_store(cuda_context& ctx, uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t q_stride,
                             int64_t kv_stride, const float* cos, const float* sin, int64_t n_tokens, int64_t n_head,
                             int64_t n_head_kv, int64_t head_dim, uint16_t* cache_k, uint16_t* cache_v,
                             const int32_t* pos_dev, const int32_t* seq_dev, const cuda_kv_pages& pages, int64_t n_ctx);
status op_cuda_add(cuda_context& ctx, uint16_t* x, const uint16_t* y, int64_t n);  // x += y
// x[r, :n] += bias[:n] for r < n_rows; x: [n_rows, n] contiguous.
status op_cuda_add_bias(cuda_context& ctx, uint16_t* x, const uint16_t* bias, int64_t n_rows, int64_t n);

// LoRA after a linear (model/lora.h, docs/lora.md): one adapter's F32 factors of one linear on the
// device (the layout of kernels/cuda/lora.cuh lora_slot); r == 0: the adapter leaves it alone.
struct cuda_lora_slot {
    const float* a     = nullptr;  // [r, n_in]
    const float* b     = nullptr;  // [n_out, r]
    int32_t      r     = 0;
    float        scale = 0.0f;
};
// y[i] += scale_k * (x[i] A_k^T) B_k^T with k = row_adapter[i] (device I32 [n_rows], read when the
// kernel runs; < 0: row i unchanged), slots: device [n_adapters] cuda_lora_slot, max_r: the largest
// r among them. x: [n_rows, n_in], y: [n_rows, n_out] F16. One launch.
status op_cuda_lora_add(cuda_context& ctx, const uint16_t* x, uint16_t* y, int64_t n_rows, int64_t n_in, int64_t n_out,
                        const int32_t* row_adapter, const cuda_lora_slot* slots, int32_t max_r);
// cache_k/v[*pos_dev + t] = k/v[t] for t < n_tokens (rows at or past n_ctx are skipped); k, v:
// [n_tokens, kv_dim]; caches [n_ctx, kv_dim]. pos_dev: device I32, read when the kernel runs.
status op_cuda_kv_store(cuda_context& ctx, const uint16_t* k, const uint16_t* v, uint16_t* cache_k, uint16_t* cache_v,
                        const int32_t* pos_dev, int64_t n_tokens, int64_t kv_dim, int64_t n_ctx);
// out[t] = table[ids[t]] (ids: device I32; ids out of range give zero rows); scale != 1: times
// scale in F32, rounded to F16 once (Gemma's embedding scale).
status op_cuda_embedding(cuda_context& ctx, const uint16_t* table, const int32_t* ids, uint16_t* out, int64_t n_tokens,
                         int64_t vocab, int64_t dim, float scale = 1.0f);

// ---- attention: the same arguments as ops.h, F16 device pointers ----------------------------
struct cuda_attention_args {
    const uint16_t* q   = nullptr;  // [n_q, q_stride]
    const uint16_t* k   = nullptr;  // [n_kv, kv_stride] (the KV cache; paged: its page pool)
    const uint16_t* v   = nullptr;  // [n_kv, kv_stride]
    uint16_t*       out = nullptr;  // [n_q, out_stride]
    int64_t         n_q = 0, n_kv = 0, q_pos0 = 0;
    int64_t         n_head = 0, n_head_kv = 0, head_dim = 0;
    int64_t         window   = 0;
    float           scale    = 1.0f;
    float           softcap  = 0.0f;  // > 0: scaled scores s -> softcap * tanh(s / softcap) (Gemma 2); 0 = off
    int64_t         q_stride = 0, kv_stride = 0, out_stride = 0;
    cuda_kv_pages   kv_pages;  // paged K/V: each sequence's rows through its page table
    // Ragged decode (kernels/cuda/attention.cuh attention_params): query i at position q_pos_dev[i]
    // of sequence q_seq_dev[i] (its page table row), device I32 read when the kernel runs; n_kv
    // bounds every position + 1. Decode kernel only, any n_q.
    const int32_t* q_pos_dev = nullptr;
    const int32_t* q_seq_dev = nullptr;
    // Decode kernel only (op_cuda_attention_is_decode): output column c goes to column out_col[c]
    // (device I32 [n_head * head_dim]: the inverse act-order permutation of the GPTQ linear reading
    // the output, cuda_gptq_linear::perm_inv, which then takes it as x_permuted).
    const int32_t* out_col = nullptr;
    // Decode kernel only: RoPE and the KV-cache append inside the attention (kernels/cuda/attention.cuh
    // attention_params::k_new): q unrotated, each query's own key and value row i of k_new / v_new
    // (stride new_stride), tables rope_cos / rope_sin [n_q, head_dim / 2], stored below n_ctx;
    // op_cuda_rope_kv_store is then not run before.
    const uint16_t* k_new      = nullptr;
    const uint16_t* v_new      = nullptr;
    int64_t         new_stride = 0;
    const float*    rope_cos   = nullptr;
    const float*    rope_sin   = nullptr;
    int64_t         n_ctx      = 0;
};
// Whether op_cuda_attention runs a on the decode kernel (ragged, or n_q <= 16 with even strides).
bool op_cuda_attention_is_decode(const cuda_attention_args& a);
// Decode kernel (split over the KV length) for n_q <= 16 or ragged, the tiled prefill kernel otherwise.
// The decode kernel merges its key chunks in its last blocks (one launch) unless GPTQ_DECODE_FUSE=0
// is in the environment (then a combine kernel does, the reference; the same bits).
status op_cuda_attention(cuda_context& ctx, const cuda_attention_args& a);
bool   decode_attention_one_launch();

// ---- linear layers ---------------------------------------------------------------------------
// Dense: y[m, n] = x[m, k] w[n, k]^T through cuBLAS, F16 or BF16 (bf16 = true), F32 accumulation.
status op_cuda_linear_dense(cuda_context& ctx, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n,
                            int64_t k, bool bf16 = false);
// The same with an F32 output y[m, n] (the lm_head: logits are not rounded to F16).
status op_cuda_linear_dense_f32_out(cuda_context& ctx, const uint16_t* x, const uint16_t* w, float* y, int64_t m,
                                    int64_t n, int64_t k);

// A GPTQ layer's checkpoint tensors in host memory (format.md 1.2), as read from the file.
struct gptq_host_tensors {
    const int32_t*  qweight = nullptr;  // [n_in * bits / 32, n_out]
    const int32_t*  qzeros  = nullptr;  // [n_groups, n_out * bits / 32]
    const uint16_t* scales  = nullptr;  // [n_groups, n_out] F16
    const int32_t*  g_idx   = nullptr;  // [n_in], values in [0, n_groups)
    const uint16_t* bias    = nullptr;  // [n_out] F16 or nullptr
    int64_t         n_out = 0, n_in = 0, n_groups = 0;
    int             bits       = 4;
    int64_t         group_size = 128;  // -1: one group
    int             zero_add   = 0;    // 1 for v1 ("gptq") checkpoints, 0 for v2
};

// How op_cuda_gptq_linear runs a layer on the fast int4 layout for m > 16 tokens (m <= 16: always
// the GEMV). AUTO is the dispatch table gptq_prefill_path_for; the others force a path (tests,
// benchmarks).
enum class gptq_prefill_path : int {
    GPTQ_PREFILL_AUTO = 0,
    GPTQ_PREFILL_FUSED,           // the fused int4 GEMM (kernels/cuda/gptq_int4_gemm.cuh)
    GPTQ_PREFILL_DEQUANT_CUBLAS,  // dequantize the layer to F16 in the context's scratch, then cuBLAS
    GPTQ_PREFILL_GEMV,            // the decode GEMV in chunks of 16 tokens
};
// The table (docs/cuda.md, "Prefill GEMM"; evidence in docs/perf-notes.md, session 4).
gptq_prefill_path gptq_prefill_path_for(int64_t m, int64_t n_out, int64_t n_in);
// The fused GEMM's tile (name) and k splits for m tokens of an n_in-wide layer, with a layer's
// gemm_tile / gemm_splits (0: the table's) resolved as op_cuda_gptq_linear resolves them. Reports.
struct gptq_gemm_plan_info {
    const char* tile   = "";
    int         splits = 0;
};
gptq_gemm_plan_info gptq_gemm_plan_describe(int64_t m, int64_t n_in, int gemm_tile = 0, int gemm_splits = 0);
// The fused GEMM's tiles for sweeps: gemm_tile values 1 .. gptq_gemm_tile_count() - 1; whether one
// can run on the current device (the Hopper wgmma tiles need sm_90a code and a 9.0 GPU).
int  gptq_gemm_tile_count();
bool gptq_gemm_tile_usable(int gemm_tile);

// A GPTQ layer on the device, prepared once: the fast int4 layout when it applies (4 bits, n_in a
// multiple of 32, group size -1 or a multiple of 32, groups of equal size after the act-order
// sort, sm_80+), else the checkpoint tensors as they are for the generic kernel.
struct cuda_gptq_linear {
    int64_t     n_out = 0, n_in = 0, n_groups = 0;
    int64_t     group_size = 0;  // as given (-1: one group)
    int         bits = 4, zero_add = 0;
    bool        fast   = false;
    int         unroll = 0;   // fast kernel's 16-byte loads in flight per lane (0: default); for benchmarks
    int         splits = 0;   // fast kernel's k split over blocks (0: automatic); for benchmarks
    cuda_buffer weights, sz;  // fast: the repacked layout (kernels/cuda/gptq_int4.cuh)
    cuda_buffer perm;         // fast with act-order: [n_in] I32 column order; empty otherwise
    cuda_buffer perm_inv;     // its inverse (column i of x goes to perm_inv[i]); empty without perm
    cuda_buffer qweight, qzeros, scales, g_idx;  // generic: the checkpoint tensors as they are
    cuda_buffer bias;                            // [n_out] F16 or empty

    // Fast layout, m > 16: the path and the fused GEMM's tile (cuda::int4_gemm_tile) and k splits;
    // AUTO / 0 are the dispatch tables' choices, anything else is forced (tests, benchmarks).
    gptq_prefill_path prefill   = gptq_prefill_path::GPTQ_PREFILL_AUTO;
    int               gemm_tile = 0, gemm_splits = 0;
    // Dequantize + cuBLAS in chunks of this many output rows (rounded up to 32), each chunk's F16
    // weights dequantized and multiplied before the next, in a chunk-sized buffer meant to stay in
    // L2 (docs/cuda.md "Prefill: dequantize + cuBLAS in L2-sized chunks"). 0: the whole linear at
    // once; -1: from GPTQ_DEQUANT_CHUNK_MB (megabytes of F16 per chunk; unset or 0: whole).
    int64_t dequant_chunk_rows = -1;
};
result<cuda_gptq_linear> cuda_gptq_linear_load(cuda_context& ctx, const gptq_host_tensors& t, bool allow_fast = true);
// Prefill passes (docs/cuda.md "Prefill: the next linear dequantized ahead"): when m rows of w take
// dequantize + cuBLAS, queues w's dequantization on the context's side stream into its free slot,
// so that it runs while the stream computes what comes before w; op_cuda_gptq_linear then takes
// it. A no-op otherwise or while capturing. The bits are the same either way. w's weights must be resident and
// unchanging until it is taken in the same pass.
status op_cuda_gptq_dequant_ahead(cuda_context& ctx, const cuda_gptq_linear& w, int64_t m);
// The start of a pass: what was queued ahead and not taken is dropped (cuda_context::dequant_forget).
void op_cuda_dequant_forget(cuda_context& ctx);
// y[m, n_out] = x[m, n_in] W^T (+ bias). x, y: F16 device, contiguous rows. x_permuted: x is
// already in the layer's act-order column order (x[:, i] = x_orig[:, perm[i]], made by the op
// before it, e.g. op_cuda_add_rms_norm with w.perm); only meaningful when w.perm is not empty.
status op_cuda_gptq_linear(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, uint16_t* y, int64_t m,
                           bool x_permuted = false);

// The quantized lm_head (docs/cuda.md "Quantized lm_head on the GPU"): y32[m, n_out] F32 = x[m, n_in]
// W^T (+ bias), the logits un-rounded. x: F16 device, contiguous rows, in the original column order
// (an act-order layer's x is permuted into the scratch here). w on the int4 layout only (w.fast):
// UNSUPPORTED otherwise (the caller keeps a dense F16 copy). Paths by m: the F32-output GEMV
// (m <= 16, cuda::int4_gemv_f32out); in chunks of 16 rows up to k_gptq_f32_out_gemv_max_m rows;
// above, dequantize + cuBLAS (F32 output) in chunks of output rows (w.dequant_chunk_rows when > 0,
// else about 64 MiB of F16 weights per chunk), never the whole F16 table. w.prefill forces a path
// (tests): GPTQ_PREFILL_GEMV the GEMV chunks, GPTQ_PREFILL_DEQUANT_CUBLAS dequantize + cuBLAS for
// m > 16; AUTO and FUSED the table.
constexpr int64_t k_gptq_f32_out_gemv_max_m = 64;
status op_cuda_gptq_linear_f32_out(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, float* y32,
                                   int64_t m);

// The fused decode step (docs/cuda.md "The fused decode step"): a GPTQ linear on the int4 layout with
// the op before or after it folded into the GEMV, bit for bit the plain sequence. One of:
// - norm_w: x is the residual stream h [m, n_in]; the linear multiplies rms_norm(h) * norm_w
//   (op_cuda_add_rms_norm without the add, in the layer's act-order order when it has one), with
//   silu optionally;
// - residual: y is the residual stream [m, n_out], y += the linear's output (op_cuda_add);
// - silu (with norm_w): the layer is a gate/up projection in the interleaved layout (16 gate rows,
//   then their 16 up rows, per 32; cuda_gptq_linear's rows as loaded), y [m, n_out / 2] receives
//   silu(gate) * up (op_cuda_silu_mul with block 16).
struct cuda_gptq_fusion {
    const uint16_t* norm_w   = nullptr;  // [n_in] F16
    float           eps      = 0.0f;
    bool            residual = false;
    bool            silu     = false;
    // With residual: the next RMSNorm of the stream (weights [n_out], epsilon) into x_out [m, n_out]
    // in out_perm's order (the next linear's act-order column order, or nullptr), by the kernel's
    // last block (cuda::int4_gemv_fusion::out_norm_w; the context's counters).
    const uint16_t* out_norm_w = nullptr;
    float           out_eps    = 0.0f;
    const int32_t*  out_perm   = nullptr;
    uint16_t*       x_out      = nullptr;
};
// Whether op_cuda_gptq_linear_fused runs w for m rows with f (the int4 layout, m <= 8, the shared
// memory of the normalised rows on the current device): otherwise the caller runs the plain ops.
bool op_cuda_gptq_fused_ok(const cuda_gptq_linear& w, int64_t m, const cuda_gptq_fusion& f);
// x_permuted as op_cuda_gptq_linear (residual only: a normalised input is permuted by the kernel).
status op_cuda_gptq_linear_fused(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, uint16_t* y,
                                 int64_t m, const cuda_gptq_fusion& f, bool x_permuted = false);

// ---- op timing and the fused decode step (ops_cuda_timing.cpp) -----------------------------------

// Timing of work queued on a stream: mark() records an event with timing after what is queued so
// far; once the stream has run past the last mark, intervals_ms() gives the GPU time between
// consecutive marks. Events are created on first use and reused after clear(). Not for use while
// the stream is being captured into a graph.
class cuda_timeline {
public:
    cuda_timeline() = default;
    ~cuda_timeline();
    cuda_timeline(cuda_timeline&& o) noexcept;
    cuda_timeline& operator=(cuda_timeline&& o) noexcept;
    cuda_timeline(const cuda_timeline&)            = delete;
    cuda_timeline& operator=(const cuda_timeline&) = delete;

    void   clear() { n_ = 0; }  // forget the marks (the events are kept)
    status mark(cudaStream_t s);
    size_t size() const { return n_; }
    // Waits for the last mark; size() - 1 values, ms[i] between mark i and mark i + 1.
    result<std::vector<float>> intervals_ms() const;

private:
    std::vector<void*> ev_;  // cudaEvent_t
    size_t             n_ = 0;
};

// op_cuda_kv_store with k and v rows at a stride (src_stride >= kv_dim): the keys and values of a
// fused q/k/v projection, [n_tokens, q_dim + 2 * kv_dim], stored without a copy.
status op_cuda_kv_store_strided(cuda_context& ctx, const uint16_t* k, const uint16_t* v, int64_t src_stride,
                                uint16_t* cache_k, uint16_t* cache_v, const int32_t* pos_dev, int64_t n_tokens,
                                int64_t kv_dim, int64_t n_ctx);

}  // namespace gptq
