// One Llama decoder layer on the GPU (GPTQ_CUDA builds only), written once for every caller, as
// llama_layer.cpp is on the CPU: cuda_layer_forward = cuda_attention_block + cuda_mlp_block, run by
// llama_cuda_model::forward_queued (prefill, graph decode, lockstep batches, offload, profiling)
// and by llama_cuda_layer_runner below (GPTQ's calibration passes). docs/cuda.md ("One decoder
// layer") describes it.
//
// The runner: GPTQ's calibration passes (engine/ calibration runner with --device cuda) run every
// calibration window through the layer being quantized, capture the inputs of its linears for the
// Hessians, and then run the quantized layer to produce the next layer's inputs. The same forward
// pass as llama_model::layer_forward without a KV cache (each window attends to itself, positions
// 0 .. seqlen-1), over F16 activations on the device, with llama_cuda_model's kernels.
//
//     GPTQ_ASSIGN_OR_RETURN(auto run, llama_cuda_layer_runner::create(cctx, hp, seqlen, n_windows));
//     GPTQ_TRY(run->load(*host_layer));                  // F32 host weights -> F16 device
//     GPTQ_TRY(run->forward(x_dev, n_windows, &hook, linear_input::LINEAR_INPUT_QKV));  // capture only
//     GPTQ_TRY(run->linear_update(linear_role::LINEAR_Q, wq));   // after quantizing q_proj
//     GPTQ_TRY(run->forward(x_dev, n_windows, nullptr));          // x_dev <- the layer's output
//
// Windows run in chunks (chunk_windows() at a time) so that the activations of the MLP stay small.
// With attention_cache_enable(n_windows), the attention output of all windows is kept after the
// first pass that computes it and reused until q/k/v change (load, linear_update of q/k/v) or a
// full pass replaces the inputs: GPTQ's later capture passes and the final pass then skip the
// q/k/v projections and attention (the same values: same inputs, same kernels).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "model/llama.h"
#include "ops/ops_cuda.h"
#include "ops/ops_cuda_gptq.h"

namespace gptq {

// Called with the device F16 input [n_tokens, n_in] of a linear group, valid during the call only
// (queued work on the context's stream may read it: the runner does not overwrite it until the
// stream has passed the call's work, since everything is ordered on that one stream).
using cuda_linear_input_hook =
    std::function<status(linear_input which, const uint16_t* x_dev, int64_t n_tokens, int64_t n_in)>;
// Called on a MoE layer with the input of an expert's linears, device F16 [n_tokens, n_in], valid
// during the call: which = LINEAR_INPUT_GATE_UP (the block input's rows routed to the expert) or
// LINEAR_INPUT_DOWN (act(gate) * up of those rows, or of every row for a route-all expert); expert
// k_moe_shared (the shared expert) sees every row. The block input over every row goes to the
// cuda_linear_input_hook as GATE_UP. As model/llama.h's moe_input_hook, on the device.
using cuda_moe_input_hook =
    std::function<status(int64_t expert, linear_input which, const uint16_t* x_dev, int64_t n_tokens, int64_t n_in)>;

// ---- the one decoder layer -------------------------------------------------------------------

struct cuda_moe_weights;  // model/llama_cuda_moe.h: a MoE layer's sparse block
struct cuda_moe_buffers;

// A linear on the device: dense F16 [n_out, n_in] (+ F16 bias) or GPTQ (cuda_gptq_linear, bias inside).
struct cuda_linear {
    int64_t          n_out = 0, n_in = 0;
    cuda_buffer      w;     // [n_out, n_in] F16 (dense), empty when quantized
    cuda_buffer      bias;  // [n_out] F16 (dense with bias), else empty
    bool             quantized = false;
    cuda_gptq_linear q;  // quantized: bias inside
};
// y[n, n_out] = x[n, n_in] W^T (+ bias). x_permuted: x is already in l's act-order column order
// (see op_cuda_gptq_linear).
status cuda_linear_forward(cuda_context& c, const cuda_linear& l, const uint16_t* x, uint16_t* y, int64_t n,
                           bool x_permuted = false);

// A decoder layer's weights on the device.
struct cuda_layer_weights {
    cuda_buffer attn_norm, mlp_norm;  // [n_embd] F16
    // Options (llama_hparams), empty when off: sandwich norms [n_embd] (attn_out_norm, mlp_out_norm),
    // per-head q/k norms [head_dim] (qk_norm). Norm weights with norm_plus_one hold 1 + w, added
    // in F32 before the rounding to F16.
    cuda_buffer                               attn_out_norm, mlp_out_norm, q_norm, k_norm;
    std::array<cuda_linear, k_n_linear_roles> lin;           // the roles not fused (empty when fused)
    cuda_linear                               qkv, gate_up;  // fused (q|k|v, gate|up): n_out 0 when not
    // gate_up's output features are in down's act-order column order (permuted at load), so
    // silu_mul's output is down's permuted input as it is.
    bool gate_up_in_down_order = false;
    // 16: gate_up's rows interleaved in blocks of 16 features (16 gate rows, their 16 up rows, ...; the
    // fused decode layout, docs/cuda.md "The fused decode step"); 0: gate | up.
    int64_t            gate_up_block = 0;
    const cuda_linear& linear(linear_role r) const { return lin[static_cast<size_t>(r)]; }
    // LoRA adapters (docs/lora.md), per role: device [n_adapters] cuda_lora_slot, empty when no
    // adapter touches the role; lora_max_r: the largest r of the layer's slots. Only unfused linears
    // (llama_cuda_model loads the layers unfused when it has adapters).
    std::array<cuda_buffer, k_n_linear_roles> lora;
    int32_t                                   lora_max_r = 0;
    // A MoE layer's sparse block (router, experts, shared expert) in place of gate/up/down; nullptr
    // on a dense layer.
    std::shared_ptr<cuda_moe_weights> moe;
};

// The activation buffers a pass over n rows uses (F16 device; the caller sizes them).
struct cuda_layer_buffers {
    uint16_t*         x = nullptr;                // [n, max(n_embd, q_dim)]: the norms' outputs, the attention output
    uint16_t*         q = nullptr;                // [n, q_dim]; fused q/k/v: [n, q_dim + 2 kv_dim] (q | k | v per row)
    uint16_t *        k = nullptr, *v = nullptr;  // [n, kv_dim] (unused when q/k/v are fused)
    uint16_t*         y    = nullptr;             // [n, n_embd]: o's output, then down's
    uint16_t *        gate = nullptr, *up = nullptr;  // [n, n_ff]; fused gate/up: gate [n, 2 n_ff]
    cuda_moe_buffers* moe = nullptr;                  // the MoE block's activations (a model with MoE layers)
};

// Called after each op with its kind ("rms_norm", "linear_qkv", "attention", ...): profiling marks.
using cuda_op_mark = std::function<status(const char* op)>;

// Rows [row0, row0 + n) of a mixed pass: a prompt chunk of sequence seq at positions n_past ..
// n_past + n - 1 (cuda_layer_pass::chunks).
struct cuda_attention_chunk {
    int64_t row0 = 0, n = 0, seq = 0, n_past = 0;
};

// One pass of a layer over n rows: where attention finds its keys and values, the hooks.
struct cuda_layer_pass {
    int64_t n = 0;  // rows (tokens) of hidden
    // Dequantize ahead (prefill passes of resident layers, docs/cuda.md "Prefill: the next linear
    // dequantized ahead"): before each GPTQ linear runs, the one after it is queued on the context's
    // side stream (op_cuda_gptq_dequant_ahead); after down, next_layer's first (nullptr: none).
    bool                      dequant_ahead = false;
    const cuda_layer_weights* next_layer    = nullptr;
    // RoPE rows, F32 device [rows, head_dim / 2]: with a cache one row per token; local: the rows of
    // positions 0 .. seqlen-1, shared by every window. LongRoPE's attention factor is in them.
    const float *cos = nullptr, *sin = nullptr;
    // The rows of hp.rope_local, used by the sliding-window layers when hp.rope_local_differs.
    const float *cos_local = nullptr, *sin_local = nullptr;

    // Keys/values. k_cache set: the runtime's paged KV cache (this layer's page pool, docs/cuda.md
    // "KV pages"): RoPE of q and k and the cache store in one launch at the device-held positions,
    // then attention over the cache, every row addressed through the page tables `pages`. A plain
    // pass (one sequence; pages.pages its table row): tokens at n_past .. n_past + n - 1 attend to
    // positions 0 .. their own. Ragged (decode; pages.pages every sequence's table): token t is one
    // query at position pos_dev[t] of sequence seq_dev[t], a CUDA graph replays it for any positions
    // and sequences. k_cache nullptr: local K/V (calibration): the rows are n / seqlen windows of
    // seqlen tokens at positions 0 .. seqlen-1, each attending to itself only.
    uint16_t *     k_cache = nullptr, *v_cache = nullptr;  // [n_pages][page_size][kv_dim] F16
    cuda_kv_pages  pages;                                  // the page tables (device)
    int64_t        n_ctx = 0, n_past = 0;                  // n_ctx: positions a sequence may hold
    const int32_t* pos_dev = nullptr;                      // device I32 [n]: each token's position
    const int32_t* seq_dev = nullptr;                      // ragged: device I32 [n], each token's sequence
    bool           ragged  = false;
    // Mixed passes (ragged set; a serve step: prompt chunks beside decode tokens, docs/cuda.md "Mixed
    // passes"): rope_kv_store runs once over all rows as in a ragged pass, attention is split: each
    // chunk's rows through the prefill kernels over its sequence's pages (one launch per chunk),
    // rows decode_row0 .. n-1 (one token of a sequence each) in one ragged decode launch. A ragged
    // decode pass has no chunks and decode_row0 0.
    const cuda_attention_chunk* chunks      = nullptr;
    int64_t                     n_chunks    = 0;
    int64_t                     decode_row0 = 0;
    int64_t                     seqlen      = 0;  // local: tokens per window

    // Local only: the attention output goes to attn_out ([n, q_dim], nullptr: buffers.x), and with
    // attn_reuse it is already there (q/k/v, RoPE and attention are skipped).
    uint16_t* attn_out   = nullptr;
    bool      attn_reuse = false;

    // The hook sees each linear group's input over the pass's rows (as fed to the linear: with a
    // GPTQ act-order layer on the int4 kernel, in its column order). With stop_after != COUNT the
    // layer returns false right after the hook has seen that input.
    const cuda_linear_input_hook* hook       = nullptr;
    linear_input                  stop_after = linear_input::LINEAR_INPUT_COUNT;
    const cuda_op_mark*           mark       = nullptr;  // nullptr: no marks
    // Device I32 [n]: the LoRA adapter of each row (-1: none); nullptr: no LoRA in this pass.
    const int32_t* lora_rows = nullptr;
    // MoE layers run their experts with the grouped kernels (routing read on the device, no host
    // sync: a ragged decode pass that is captured into a graph) where their weights allow it;
    // false: per expert, with the routing brought to the host (llama_cuda_moe.h).
    bool moe_grouped = false;
    // MoE layers (calibration): each expert's inputs (per expert; stop_after GATE_UP / DOWN: once
    // every expert's has been seen), and the experts whose down input is computed over every row
    // (route-all, [n_expert]; nullptr: none).
    const cuda_moe_input_hook* moe_hook      = nullptr;
    const std::vector<bool>*   moe_route_all = nullptr;
    // The fused decode step may run where it applies (cuda_layer_fusion_of); false: the plain ops.
    // decode_fuse: the attention parts; decode_fuse_gemv: the GEMV parts (llama_cuda_options).
    // decode_fuse_epi: the epilogue fusions alone (llama_cuda_options::decode_fuse_epi); next_norm: the
    // next layer (resident), whose attention norm down's GEMV may write into buffers.x; x_ready: the
    // previous layer's down did, so the attention block skips its norm.
    bool                      decode_fuse = false, decode_fuse_gemv = false, decode_fuse_epi = false;
    const cuda_layer_weights* next_norm = nullptr;
    bool                      x_ready   = false;
};

// Which of the fused decode step's kernels a layer's pass runs (docs/cuda.md "The fused decode step"),
// each bit for bit the plain ops it replaces:
// - qkv_norm: the attention norm folded into the fused q/k/v GEMV (a pending residual is added first);
// - mlp: o's output added to the residual stream in o's GEMV, the MLP norm folded into the fused
//   gate/up GEMV, down's output added in down's GEMV (the layer's output is then in hidden);
// - silu (with mlp): SiLU * up in the gate/up GEMV (its rows interleaved, gate_up_block 16).
// - attn_rope: RoPE and the KV-cache append inside the decode attention (no rope_kv_store launch), when
//   every attention launch of the pass is the decode kernel.
// The epilogue fusions (p.decode_fuse_epi, not with mlp):
// - o_norm: o's output added to hidden in o's GEMV, whose last block writes the MLP norm into
//   buffers.x (in gate/up's column order); the MLP block then starts at gate/up;
// - silu_epi: SiLU * up in the gate/up GEMV (rows interleaved), the plain norm before it;
// - down_norm: down's output added to hidden in down's GEMV, whose last block writes p.next_norm's
//   attention norm into buffers.x (in its q/k/v column order); the caller passes x_ready to it.
struct cuda_layer_fusion {
    bool qkv_norm = false, mlp = false, silu = false, attn_rope = false;
    bool o_norm = false, silu_epi = false, down_norm = false;
};
cuda_layer_fusion cuda_layer_fusion_of(const llama_hparams& hp, const cuda_layer_weights& w, const cuda_layer_pass& p);

// The residual stream is carried as the runtime carries it: each residual add is folded into the
// RMSNorm after it (op_cuda_add_rms_norm, bit for bit op_cuda_add then op_cuda_rms_norm). The
// attention block adds `pending` (the previous layer's down output, nullptr: none) to hidden in its
// norm; the MLP block adds o's output in its norm; down's output is left in buffers.y, to be added
// by the next layer (its `pending`) or by the caller (op_cuda_add, the final norm).
// Each returns false when it stopped at p.stop_after.
// With f.mlp, o's output is added to hidden by o's GEMV (not left in buffers.y), and the MLP block
// reads hidden as it is; with f.mlp down's output is added to hidden as well, and cuda_layer_forward
// sets *output_added (the caller has nothing pending). With f.down_norm, *x_out_ready is set: the
// next layer's normalised input is in buffers.x and hidden is complete (*output_added too).
result<bool> cuda_attention_block(cuda_context& c, const llama_hparams& hp, int64_t i_layer,
                                  const cuda_layer_weights& w, uint16_t* hidden, const uint16_t* pending,
                                  const cuda_layer_buffers& b, const cuda_layer_pass& p,
                                  const cuda_layer_fusion& f = {});
// hidden += buffers.y (o's output), norm, gate/up, SiLU * up, down into buffers.y.
result<bool> cuda_mlp_block(cuda_context& c, const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* hidden,
                            const cuda_layer_buffers& b, const cuda_layer_pass& p, const cuda_layer_fusion& f = {});
result<bool> cuda_layer_forward(cuda_context& c, const llama_hparams& hp, int64_t i_layer, const cuda_layer_weights& w,
                                uint16_t* hidden, const uint16_t* pending, const cuda_layer_buffers& b,
                                const cuda_layer_pass& p, bool* output_added = nullptr, bool* x_out_ready = nullptr);

// ---- the calibration runner ----------------------------------------------------------------------

class llama_cuda_layer_runner {
public:
    // seqlen: tokens per window; max_chunk_tokens bounds the tokens processed at once (0: 16384).
    static result<std::unique_ptr<llama_cuda_layer_runner>> create(cuda_context& ctx, const llama_hparams& hp,
                                                                   int64_t seqlen, int64_t max_chunk_tokens = 0);

    // Upload a host layer (F32, dense linears) as F16; values beyond the F16 range are an error
    // naming the tensor.
    // w16 (or nullptr): F16 copies of the dense linears made ahead, [role] = f32_to_f16 of its w,
    // every value in range and exact (an empty entry: converted here as without it).
    status load(const llama_layer& layer, const std::vector<std::vector<uint16_t>>* w16 = nullptr);
    // Replace one linear's weight by w [n_out, n_in] (F32 host, e.g. the dequantized GPTQ weight).
    status linear_update(linear_role r, const std::vector<float>& w);
    // The same from GPTQ codes on the device, dequantized there (the same F16 values as the host
    // path's F32 dequantization rounded to F16; the same range error).
    status linear_update(linear_role r, const cuda_gptq_codes& q);
    // The linear's F16 weight on the device when it widens back to the F32 weight load() was
    // given, bit for bit (every value F16-representable, e.g. an F16 checkpoint), else nullptr;
    // nullptr after an update. [n_out, n_in], valid until the next load / update.
    const uint16_t* linear_f16_if_exact(linear_role r) const;

    // hidden: device F16 [n_windows * seqlen, n_embd]. With stop_after == LINEAR_INPUT_COUNT the
    // layer's output replaces hidden; otherwise each window runs until the hook has seen
    // `stop_after` and hidden is left unchanged. The hook sees each chunk's inputs in turn. On a MoE
    // layer moe_hook sees each expert's inputs, route_all as cuda_layer_pass::moe_route_all.
    status forward(uint16_t* hidden, int64_t n_windows, const cuda_linear_input_hook* hook,
                   linear_input               stop_after = linear_input::LINEAR_INPUT_COUNT,
                   const cuda_moe_input_hook* moe_hook = nullptr, const std::vector<bool>* route_all = nullptr);
    // A MoE layer's block (router, experts, shared expert and its gate) uploaded again from the host
    // layer (F32, dense): GPTQ's MoE pass replaces the experts in the host layer only.
    status moe_load(const llama_layer& layer);

    // Keep the attention output of n_windows windows (n_windows * seqlen * q_dim F16 on the device).
    status attention_cache_enable(int64_t n_windows);
    bool   attention_cached() const { return attn_valid_; }
    // Host threads for the F32 -> F16 conversions of load / linear_update (nullptr: one thread).
    void     set_thread_pool(thread_pool* pool) { pool_ = pool; }
    int64_t  chunk_windows() const { return chunk_windows_; }
    uint64_t device_bytes() const;  // weights + activations held

private:
    llama_cuda_layer_runner() = default;
    // exact (optional): whether every value is F16-representable (the F16 copy widens back to v).
    status upload_f16(const std::vector<float>& v, const std::string& name, cuda_buffer* out, bool* exact = nullptr);

    cuda_context*                      ctx_ = nullptr;
    llama_hparams                      hp_;
    int64_t                            seqlen_ = 0, chunk_windows_ = 0, layer_index_ = -1;
    cuda_layer_weights                 w_;                                  // dense, never fused
    cuda_buffer                        h_, x_, q_, k_, v_, y_, gate_, up_;  // one chunk's activations
    cuda_buffer                        cos_, sin_;                          // [seqlen, head_dim / 2] F32
    cuda_buffer                        cos_local_, sin_local_;  // the same for hp.rope_local (when it differs)
    std::shared_ptr<cuda_moe_buffers>  moe_buf_;                // a MoE layer's block activations (one chunk)
    cuda_buffer                        attn_;                   // [attn_windows_ * seqlen, q_dim] F16 attention output
    int64_t                            attn_windows_ = 0;
    bool                               attn_valid_   = false;
    thread_pool*                       pool_         = nullptr;
    std::array<bool, k_n_linear_roles> exact_{};  // linear_f16_if_exact
};

}  // namespace gptq
