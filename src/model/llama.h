// The decoder-only families of io/arch.h (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, ...): hparams
// from config.json, the table of HF tensor names and shapes, and the forward pass over ops/,
// written once and used by calibration, ppl and generation. The family's description (io/arch.h)
// becomes options in llama_hparams; the forward tests options, never the family.
// docs/model-runtime.md describes the design, docs/architectures.md the families.
//
// Layer at a time: llama_model::layer_load(i) reads only layer i's tensors (converted to F32) and
// llama_model::layer_forward (llama_layer.cpp) runs one decoder layer on given hidden states of a
// ragged batch of sequences [sum n_tokens, n_embd] (a single sequence is a batch of one). A
// hook sees the input of every linear group (q/k/v share one input, o, gate/up share one, down),
// and a layer's linear weights are plain F32 matrices the caller may replace (e.g. by a
// dequantized GPTQ matrix) before running it.
//
// Legend: n_tokens tokens in a call, n_embd = hidden_size, n_ff = intermediate_size, hd = head_dim,
// n_head / n_head_kv query / key-value heads, kv_dim = n_head_kv * hd. All compute is F32.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/checkpoint.h"
#include "io/gptq_config.h"
#include "io/hf_config.h"
#include "io/tensor_source.h"
#include "ops/gptq_linear.h"
#include "ops/ops.h"

namespace gptq {

class thread_pool;

enum class linear_role : uint8_t {
    LINEAR_Q,
    LINEAR_K,
    LINEAR_V,
    LINEAR_O,
    LINEAR_GATE,
    LINEAR_UP,
    LINEAR_DOWN,
    LINEAR_COUNT,
};
constexpr int k_n_linear_roles = static_cast<int>(linear_role::LINEAR_COUNT);
const char*   linear_role_name(linear_role r);  // "q_proj", ..., "down_proj"

// The distinct inputs of a decoder layer's linears, in GPTQ's true-sequential order.
enum class linear_input : uint8_t {
    LINEAR_INPUT_QKV,      // normed hidden states -> q, k, v  [n_tokens, n_embd]
    LINEAR_INPUT_O,        // attention output     -> o        [n_tokens, n_head * hd]
    LINEAR_INPUT_GATE_UP,  // normed hidden states -> gate, up [n_tokens, n_embd]
    LINEAR_INPUT_DOWN,     // silu(gate) * up      -> down     [n_tokens, n_ff]
    LINEAR_INPUT_COUNT,
};
linear_input linear_role_input(linear_role r);
const char*  linear_input_name(linear_input i);  // "qkv", "o", "gate_up", "down"

struct llama_hparams {
    model_family         family                  = model_family::MODEL_FAMILY_LLAMA;
    const arch_desc*     arch                    = nullptr;  // tensor names and layout (io/arch.h)
    int64_t              n_vocab                 = 0;
    int64_t              n_embd                  = 0;
    int64_t              n_ff                    = 0;
    int64_t              n_layer                 = 0;
    int64_t              n_head                  = 0;
    int64_t              n_head_kv               = 0;
    int64_t              head_dim                = 0;
    float                rms_eps                 = 1e-6f;
    int64_t              max_position_embeddings = 0;
    rope_config          rope;
    bool                 tie_embeddings = false;
    bool                 qkv_bias       = false;
    bool                 o_bias         = false;
    bool                 mlp_bias       = false;
    std::vector<int64_t> window;  // [n_layer] sliding window of each layer in tokens, 0 = full attention

    // Options of the one decoder layer (llama_layer.cpp tests these, never the family). Defaults:
    // Llama. Norm weights are F32 as the forward uses them (norm_plus_one already folded in).
    bool           qk_norm       = false;  // RMSNorm per head of q and k (weights [head_dim]) before RoPE
    bool           norm_plus_one = false;  // every RMSNorm scales by (1 + w); folded at load (exact in F32)
    bool           attn_out_norm = false;  // sandwich: RMSNorm of attention's output before the residual add
    bool           mlp_out_norm  = false;  // sandwich: RMSNorm of the MLP's output before the residual add
    mlp_activation act           = mlp_activation::ACT_SILU;  // act(gate) * up
    float          embed_scale   = 1.0f;  // embeddings multiplied by it (Gemma: sqrt(n_embd) in F32); 1 = off
    float          attn_scale    = 0.0f;  // softmax scale of q.k: 1/sqrt(head_dim), or query_pre_attn_scalar^-0.5
    float          attn_softcap  = 0.0f;  // > 0: scores = cap * tanh(scores / cap) before the mask; 0 = off
    float          final_softcap = 0.0f;  // > 0: logits = cap * tanh(logits / cap); 0 = off
    // RoPE of the sliding-window layers when it differs (Gemma 3 local layers: another base).
    bool        rope_local_differs = false;
    rope_config rope_local;
    // The checkpoint stores q/k/v as one self_attn.qkv_proj and gate/up as one mlp.gate_up_proj
    // (Phi-3): the layer still holds seven linears, sliced by output rows at load and joined again
    // when a quantized checkpoint is written (a linear's output rows are independent).
    // llama_model::open clears them when the checkpoint stores the parts apart (GPTQModel 7.6
    // writes Phi-3's gate_proj and up_proj so): the checkpoint's layout, not the family's.
    bool fused_qkv     = false;
    bool fused_gate_up = false;

    // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; docs/architectures.md "Mixture of
    // experts"): n_expert > 0 on a MoE model. A layer with moe_layer[i] runs the sparse block
    // (router, top-k, experts of n_ff_expert, shared expert of n_ff_shared when > 0) instead of the
    // dense MLP (whose gate/up/down linears it then does not have); n_ff is the dense MLP's size
    // (Qwen's mlp_only_layers).
    int64_t           n_expert      = 0;
    int64_t           n_expert_used = 0;  // top-k
    int64_t           n_ff_expert   = 0;
    int64_t           n_ff_shared   = 0;
    bool              moe_renorm    = false;  // top-k weights divided by their sum (Mixtral; Qwen norm_topk_prob)
    std::vector<bool> moe_layer;              // [n_layer]
    bool              is_moe(int64_t i_layer) const { return n_expert > 0 && moe_layer[static_cast<size_t>(i_layer)]; }

    int64_t q_dim() const { return n_head * head_dim; }
    int64_t kv_dim() const { return n_head_kv * head_dim; }
    // [n_out, n_in] of a linear.
    std::array<int64_t, 2> linear_shape(linear_role r) const;
    // The RoPE settings of layer i (rope, or rope_local on a sliding-window layer when it differs).
    const rope_config& rope_of(int64_t i_layer) const;
    // The options above in use that a Llama / Mistral / Qwen2 layer does not have ("qk_norm,
    // fused_qkv, longrope", ...), "" when none: a backend that does not run them yet refuses the
    // model with this list (no silent wrong answer).
    std::string options_beyond_llama() const;
    // The options above in use that the one GPU decoder layer (llama_cuda_layer.cpp, the runtime
    // and the calibration runner) does not run yet, "" when none: llama_cuda_model::open and
    // quantize --device cuda refuse the model with this list (docs/architectures.md, GPU column).
    std::string options_beyond_gpu() const;
};

// Whether the GPU may run hp (llama_cuda_model::open, quantize --device cuda; `who` starts the
// message): options the GPU layer does not run are refused by name (none today; every option of
// the families was checked against the CPU on an H100: docs/architectures.md, "GPU").
status llama_gpu_options_check(const llama_hparams& hp, const std::string& who);

// Upper bound of the layer count, head counts and head_dim a config may give (docs/reliability.md).
constexpr int64_t k_llama_max_dim = int64_t(1) << 16;

// Checks what the forward pass supports; unsupported values are errors naming the value.
result<llama_hparams> llama_hparams_from_config(const model_config& cfg);

// RoPE inverse frequencies [head_dim / 2] for a forward pass whose last position is seq_len - 1
// (only the dynamic variant depends on it), computed in F32 as transformers does.
std::vector<float> llama_rope_inv_freq(const llama_hparams& hp, int64_t seq_len);
// The same for one layer's RoPE settings (hp.rope_of(i)); LongRoPE picks short or long factors by
// seq_len. cos/sin are then multiplied by llama_rope_attention_factor (1 except LongRoPE).
std::vector<float> llama_rope_inv_freq(const llama_hparams& hp, const rope_config& rope, int64_t seq_len);
float              llama_rope_attention_factor(const rope_config& rope);

// One tensor of the HF checkpoint: name, expected shape, and whether it may be absent.
struct tensor_spec {
    std::string          name;
    std::vector<int64_t> shape;
    bool                 optional = false;
};
std::vector<tensor_spec> llama_global_tensors(const llama_hparams& hp);  // embeddings, final norm, lm_head
// GPTQModel's quantized input embeddings (docs/quantize.md "Quantized embeddings"), model.embed_tokens
// stored as the GPTQ linear of E^T, read as the dense F32 table [n_vocab, n_embd] = scale * (code -
// zero): what the CPU model embeds with (and a tied lm_head multiplies by) and the GPU model uploads.
status llama_read_quantized_embedding(const tensor_source& src, const llama_hparams& hp, const gptq_config& qc,
                                      std::vector<float>* table);
std::vector<tensor_spec> llama_layer_tensors(const llama_hparams& hp, int64_t i_layer);
std::string              llama_linear_name(int64_t i_layer, linear_role r);  // "model.layers.3.self_attn.q_proj"
bool                     llama_linear_has_bias(const llama_hparams& hp, linear_role r);  // Qwen2 q/k/v, ...

// Where a linear's rows live in the checkpoint: the module (its .weight, .bias or GPTQ tensors),
// the first output row of this role in it and the module's output rows. Unfused: the role's own
// module, rows [0, n_out). Fused (Phi-3): "...self_attn.qkv_proj" with q at 0, k at q_dim, v at
// q_dim + kv_dim; "...mlp.gate_up_proj" with gate at 0, up at n_ff.
struct linear_slot {
    std::string module;
    int64_t     row0         = 0;
    int64_t     n_out_module = 0;
};
linear_slot llama_linear_slot(const llama_hparams& hp, int64_t i_layer, linear_role r);
// The checkpoint modules of layer i's linears in role order, fused ones once (q, k, v, o, ... or
// qkv, o, gate_up, down), with the roles each holds.
struct linear_module {
    std::string              module;
    std::vector<linear_role> roles;
};
std::vector<linear_module> llama_linear_modules(const llama_hparams& hp, int64_t i_layer);

// The linears of a layer's sparse MoE block besides the router: expert e's SwiGLU (gate, up, down;
// Mixtral w1, w3, w2) and the shared expert's (expert == -1).
enum class moe_proj : uint8_t { MOE_GATE, MOE_UP, MOE_DOWN };
const char*       moe_proj_name(moe_proj p);  // "gate", "up", "down"
constexpr int64_t k_moe_shared = -1;          // the shared expert's index in the functions below
// Checkpoint names (as transformers saves and GPTQModel writes them): "model.layers.3.mlp.gate",
// "model.layers.3.block_sparse_moe.experts.5.w1", "model.layers.3.mlp.shared_expert.up_proj",
// "model.layers.3.mlp.shared_expert_gate".
std::string llama_moe_router_name(const llama_hparams& hp, int64_t i_layer);
std::string llama_moe_expert_name(const llama_hparams& hp, int64_t i_layer, int64_t expert, moe_proj p);
std::string llama_moe_shared_gate_name(const llama_hparams& hp, int64_t i_layer);
// [n_out, n_in] of an expert's (or the shared expert's) linear.
std::array<int64_t, 2> llama_moe_shape(const llama_hparams& hp, int64_t expert, moe_proj p);
// The quantizable linears of layer i's MoE block (shared expert first, then experts 0 .. n-1, each
// gate, up, down); empty on a dense layer. The router and the shared expert's gate are not among
// them (never quantized, as GPTQModel).
struct moe_linear {
    std::string module;
    int64_t     expert = 0;
    moe_proj    proj   = moe_proj::MOE_GATE;
};
std::vector<moe_linear> llama_moe_linears(const llama_hparams& hp, int64_t i_layer);

struct linear_weights {
    int64_t            n_out = 0;
    int64_t            n_in  = 0;
    std::vector<float> w;  // [n_out, n_in] row-major (PyTorch layout); empty when `q` or `w16` is set
    // The same in F16 bits when the model keeps F16 weights F16 (llama_open_options::keep_f16).
    std::vector<uint16_t> w16;
    std::vector<float>    bias;  // [n_out], or empty
    // A GPTQ linear of a quantized checkpoint stays quantized (dequantized on the fly); nullptr for
    // dense weights. The quantizer works on dense `w` (linear_replace clears `q`).
    std::shared_ptr<const gptq_packed_linear> q;

    // The weight as a dense [n_out, n_in] F32 matrix (a copy; dequantized when quantized).
    std::vector<float> dense() const;
};

// y[n_rows, n_out] = x[n_rows, n_in] W^T + bias, dense or quantized.
void linear_forward(const ops_context& ctx, const linear_weights& l, const float* x, float* y, int64_t n_rows);
// Its input gradient (llama_train.cpp): dx[n_rows, n_in] (+)= dy[n_rows, n_out] W, W frozen (F32,
// F16, or GPTQ dequantized a block of rows at a time); accumulate: add to dx instead of writing it.
void linear_backward_input(const ops_context& ctx, const linear_weights& l, const float* dy, float* dx, int64_t n_rows,
                           bool accumulate);

// A SwiGLU expert: gate, up [n_ff, n_embd] and down [n_embd, n_ff], dense or GPTQ.
struct moe_expert {
    std::array<linear_weights, 3> linears;
    linear_weights&               linear(moe_proj p) { return linears[static_cast<size_t>(p)]; }
    const linear_weights&         linear(moe_proj p) const { return linears[static_cast<size_t>(p)]; }
};

// A layer's sparse MoE block: the router (never quantized), the experts, and the shared expert with
// its sigmoid gate [1, n_embd] (Qwen2-MoE; empty linears otherwise).
struct llama_moe {
    linear_weights          router;  // [n_expert, n_embd]
    std::vector<moe_expert> experts;
    moe_expert              shared;
    linear_weights          shared_gate;
    moe_expert&             expert(int64_t e) { return e == k_moe_shared ? shared : experts[static_cast<size_t>(e)]; }
    const moe_expert& expert(int64_t e) const { return e == k_moe_shared ? shared : experts[static_cast<size_t>(e)]; }
};

// The routing of a MoE block over n_rows tokens: top-k experts and weights per token (in torch.topk's
// order, weights renormalised when hp.moe_renorm), and the tokens grouped by expert.
struct moe_routing {
    int64_t              n_rows = 0, k = 0;
    std::vector<int32_t> expert;  // [n_rows, k]
    std::vector<float>   weight;  // [n_rows, k]
    // Tokens routed to expert e: rows[offset[e] .. offset[e + 1]) (ascending), with slot[] their
    // position in the token's top-k (the weight's column).
    std::vector<int64_t> offset;  // [n_expert + 1]
    std::vector<int64_t> rows;
    std::vector<int32_t> slot;
    int64_t count(int64_t e) const { return offset[static_cast<size_t>(e) + 1] - offset[static_cast<size_t>(e)]; }
};
// Router logits, F32 softmax, top-k (transformers' TopKRouter), grouped by expert. x: [n_rows, n_embd].
moe_routing moe_route(const ops_context& ctx, const llama_hparams& hp, const llama_moe& moe, const float* x,
                      int64_t n_rows);

// act(gate(x)) * up(x) of an expert over n rows x[n, n_embd]: h[n, n_ff] (the input of its down).
void moe_expert_hidden(const ops_context& ctx, const llama_hparams& hp, const moe_expert& ex, const float* x, int64_t n,
                       std::vector<float>* h);

// One decoder layer's weights in F32.
struct llama_layer {
    int64_t                                      index = 0;
    std::vector<float>                           attn_norm;      // [n_embd] input_layernorm
    std::vector<float>                           mlp_norm;       // [n_embd] post_attention_layernorm (Llama)
    std::vector<float>                           attn_out_norm;  // [n_embd] when hp.attn_out_norm, else empty
    std::vector<float>                           mlp_out_norm;   // [n_embd] when hp.mlp_out_norm, else empty
    std::vector<float>                           q_norm;         // [head_dim] when hp.qk_norm, else empty
    std::vector<float>                           k_norm;         // [head_dim] when hp.qk_norm, else empty
    std::array<linear_weights, k_n_linear_roles> linears;        // gate/up/down empty (n_out 0) on a MoE layer
    std::unique_ptr<llama_moe>                   moe;            // the sparse block on a MoE layer, else nullptr

    linear_weights&       linear(linear_role r) { return linears[static_cast<size_t>(r)]; }
    const linear_weights& linear(linear_role r) const { return linears[static_cast<size_t>(r)]; }
    // Replace a linear's weight matrix (e.g. by its dequantized GPTQ version); w: [n_out, n_in].
    status linear_replace(linear_role r, std::vector<float> w);
};

// Keys and values of every layer for positions 0 .. n_ctx-1; positions < n_past are filled.
// Sliding-window layers keep all positions too (the mask does the windowing). F32 (k, v) or F16
// (k16, v16: the generation sessions' cache, half the bytes; keys and values are rounded to F16
// when stored, and every query, of the prompt or of a decode step, reads the rounded values).
struct kv_cache {
    int64_t                            n_ctx  = 0;
    int64_t                            kv_dim = 0;
    int64_t                            n_past = 0;
    bool                               f16    = false;  // k16/v16 hold the cache, k/v are empty
    std::vector<std::vector<float>>    k;               // [n_layer][n_ctx, kv_dim] rotated keys
    std::vector<std::vector<float>>    v;               // [n_layer][n_ctx, kv_dim]
    std::vector<std::vector<uint16_t>> k16;             // the same as F16 bits when f16
    std::vector<std::vector<uint16_t>> v16;
    // The tokens of positions 0 .. n_past-1 (forward / forward_batch keep it): a LongRoPE model
    // re-prefills them when a sequence first passes original_max_position_embeddings, as
    // transformers' Phi3ForCausalLM.prepare_inputs_for_generation drops its cache there.
    std::vector<int32_t> ids;

    static kv_cache create(const llama_hparams& hp, int64_t n_ctx, bool f16 = false);
    // Bytes of keys and values per position (all layers): 2 * n_layer * kv_dim * (2 or 4).
    static uint64_t bytes_per_position(const llama_hparams& hp, bool f16);
    int64_t         n_layer() const { return static_cast<int64_t>(f16 ? k16.size() : k.size()); }
    void            clear() {
                   n_past = 0;
                   ids.clear();
    }
};

// Called with the input of each linear group as the layer runs; x: [n_tokens, n_in] row-major,
// valid during the call only.
using linear_input_hook =
    std::function<void(int64_t i_layer, linear_input which, const float* x, int64_t n_tokens, int64_t n_in)>;

// Called on a MoE layer with the input of each expert's linears: which = LINEAR_INPUT_GATE_UP (the
// normed hidden states of the tokens routed to it) or LINEAR_INPUT_DOWN (act(gate) * up of those
// tokens); expert k_moe_shared (the shared expert) sees every token. rows: the tokens' row indices in
// the batch (ascending), n_tokens of them; x: [n_tokens, n_in]. The block's input over all tokens
// (which the router and the shared expert's gate read) goes to the linear_input_hook as GATE_UP.
using moe_input_hook = std::function<void(int64_t i_layer, int64_t expert, linear_input which, const float* x,
                                          const int64_t* rows, int64_t n_tokens, int64_t n_in)>;

// One sequence of the ragged batch a decoder layer runs on: n_tokens new tokens at positions
// pos0 .. pos0 + n_tokens - 1, stored in the batch's hidden states after the previous sequences'
// rows. With a cache (pos0 == cache->n_past, which the layer does not advance) the layer's
// keys/values are stored at those positions and attention covers positions 0 .. pos0 + n_tokens - 1;
// without one (local K/V: ppl, calibration) attention covers the sequence's given tokens only.
// lora: the index of the model's LoRA adapter (llama_model::lora_add) its rows use, -1 none.
struct layer_seq {
    int64_t   n_tokens = 0;
    int64_t   pos0     = 0;
    kv_cache* cache    = nullptr;
    int32_t   lora     = -1;
};

struct lora_adapter;

// A batch of LoRA training (llama_train.cpp, docs/lora.md "Fine-tuning"): sequences stored back to
// back without padding, each attending to its own tokens only (positions from 0).
struct train_batch {
    std::vector<int32_t> ids;       // [n_rows] token ids
    std::vector<int32_t> targets;   // [n_rows] the token row i is trained to predict (the next one), -1: no loss
    std::vector<int64_t> n_tokens;  // [n_seq] rows of each sequence
    int64_t              n_targets() const;
};

// LoRA dropout of a training call (PEFT's lora_dropout; docs/lora.md "Dropout"): on the input x of
// each adapted linear's LoRA branch, before A, kept values scaled by 1 / (1 - p); the masks are
// core/dropout_mask.h's of `seed` (the same on the CPU and the GPU). p 0: none.
struct lora_dropout_spec {
    double   p    = 0.0;
    uint64_t seed = 0;
};

// The dropped LoRA input: out[i, c] = x[i, c] / (1 - p) where element (row0 + i) * n_in + c of
// module (layer, r) is kept, else 0. out may alias x.
void lora_dropout_rows(const lora_dropout_spec& d, int64_t layer, linear_role r, const float* x, float* out,
                       int64_t row0, int64_t n_rows, int64_t n_in);

// Whether LoRA training runs hp's layer: the Llama / Mistral / Qwen2 layer (RMSNorm, RoPE, causal
// GQA attention with an optional sliding window, SiLU MLP, q/k/v biases) is; options beyond it
// (llama_hparams::options_beyond_llama: MoE, soft-capping, qk_norm, ...) are refused by name.
status llama_train_check(const llama_hparams& hp, const std::string& who);

struct llama_open_options {
    bool strict = false;  // tensors the model does not use are an error (else a warning)
    // F16 checkpoint tensors of dense linears, embeddings and lm_head stay F16 in memory (the
    // inference sessions: resident bytes = file bytes); otherwise everything is read as F32 (the
    // quantizer works on F32 weights).
    bool keep_f16 = false;
};

class llama_model {
public:
    // Read config.json, open the weights (memory-mapped, nothing read) and check that every tensor
    // of the table is present with its shape and a float dtype, and that the weights hold no layer
    // past num_hidden_layers; other tensors the model does not read are a warning (strict: error).
    static result<std::unique_ptr<llama_model>> open(const std::string& path, const llama_open_options& options = {});

    const llama_hparams& hparams() const { return hp_; }
    const model_config&  config() const { return cfg_; }
    const tensor_source& source() const { return *src_; }
    // The GPTQ settings when the checkpoint is GPTQ-quantized (found by checkpoint_detect, in
    // io/checkpoint.h: config.json quantization_config and/or quantize_config.json), else nullptr.
    // Its linears stay quantized (qweight/qzeros/scales/g_idx, dequantized on the fly).
    const gptq_config* quantization() const { return gptq_ ? &*gptq_ : nullptr; }
    // The settings of one module ("model.layers.0.mlp.down_proj", "lm_head") when its tensors are
    // GPTQ, with GPTQModel's per-module `dynamic` overrides applied; nullptr for a dense module.
    const gptq_config* quantization_of(std::string_view module) const;

    // Layer i's weights, read from the checkpoint now (nothing else is read); with a pool, the
    // linears are read (and converted to F32) in parallel.
    result<std::unique_ptr<llama_layer>> layer_load(int64_t i_layer, thread_pool* pool = nullptr) const;
    // Keep every layer resident (ppl, generation). Idempotent.
    status       layers_load_all();
    llama_layer* layer(int64_t i_layer) { return layers_[static_cast<size_t>(i_layer)].get(); }  // or nullptr

    // Embeddings, final norm and lm_head in F32 (the embedding table serves a tied lm_head); a GPTQ
    // lm_head ("lm_head": true) stays quantized like the layers' linears.
    status globals_load();

    // Host bytes held once layers_load_all() and globals_load() are done: F32 norms, embeddings
    // and lm_head (F16 ones in F16 with keep_f16); dense linears likewise, GPTQ linears as nibbles
    // (bytes for 8 bits) + F32 scales and zeros (gptq_packed_linear). An estimate for the memory checks of engine/
    // (docs/reliability.md); the transient buffers of the tensor being read are not counted.
    uint64_t resident_bytes() const;

    // out[n_tokens, n_embd] = embedding rows of ids; an id outside [0, n_vocab) is an error.
    status embed(const int32_t* ids, int64_t n_tokens, float* out);

    // One decoder layer on the ragged batch hidden[sum n_tokens, n_embd] (in place; layer_seq says
    // what each sequence's rows are). Every linear runs once over all rows; RoPE and attention per
    // sequence. The hook sees each linear group's input over all rows (n_tokens = sum n_tokens).
    // With stop_after != LINEAR_INPUT_COUNT the call returns right after the hook has seen that
    // input (GPTQ's capture passes need nothing later); hidden is then left unspecified.
    // On a MoE layer moe_hook sees each expert's inputs (stop_after GATE_UP / DOWN: once every
    // expert's has been seen).
    void layer_forward(const ops_context& ctx, const llama_layer& layer, float* hidden, std::span<const layer_seq> seqs,
                       const linear_input_hook* hook       = nullptr,
                       linear_input             stop_after = linear_input::LINEAR_INPUT_COUNT,
                       const moe_input_hook*    moe_hook   = nullptr) const;
    // The same on one sequence (a batch of one): hidden[n_tokens, n_embd], tokens at positions
    // pos0 .. pos0 + n_tokens - 1, cache as in layer_seq (nullptr: local K/V).
    void layer_forward(const ops_context& ctx, const llama_layer& layer, float* hidden, int64_t n_tokens, int64_t pos0,
                       kv_cache* cache, const linear_input_hook* hook = nullptr,
                       linear_input          stop_after = linear_input::LINEAR_INPUT_COUNT,
                       const moe_input_hook* moe_hook   = nullptr) const;

    // out[n_tokens, n_embd] = final_norm(hidden[n_tokens, n_embd]): lm_head's input (globals_load first).
    void final_norm(const ops_context& ctx, const float* hidden, int64_t n_tokens, float* out) const;
    // lm_head's dense weight [n_vocab, n_embd] in F32: the embedding table when tied (globals_load
    // first). An error when lm_head is GPTQ-quantized (there is no dense weight to give).
    result<std::vector<float>> lm_head_dense_weight() const;
    // logits[n_tokens, n_vocab] = lm_head(final_norm(hidden[n_tokens, n_embd])); hidden unchanged.
    void output_logits(const ops_context& ctx, const float* hidden, int64_t n_tokens, float* logits) const;

    // Whole model on ids (layers loaded on demand and kept): logits[n_tokens, n_vocab]. With a
    // cache the tokens follow its n_past positions, and n_past advances by n_tokens.
    // lora: the adapter the tokens run with (lora_add's index), -1 none.
    status forward(const ops_context& ctx, const int32_t* ids, int64_t n_tokens, kv_cache* cache, float* logits,
                   int32_t lora = -1);

    // A ragged batch of n_seq independent sequences (llama_batch.cpp): sequence s contributes
    // n_tokens[s] >= 1 new tokens, stored back to back in ids[sum n_tokens], which follow the
    // n_past positions of caches[s] (advanced by n_tokens[s]). Every linear runs once over all
    // the batch's rows ([sum n_tokens, n_in], no padding); RoPE and attention run per sequence
    // over its own cache, so the sequences may be at different positions and mix prompt chunks with
    // single decode tokens. logits: per sequence in order, the logits of its last token (one row of
    // n_vocab), or of every one of its tokens (n_tokens[s] rows) when all_logits[s] (all_logits
    // nullptr: last tokens only, [n_seq, n_vocab]). Only those rows reach the final norm and lm_head.
    // Used by the CPU model_session (engine/model_session.h): ragged steps of generate, bench, serve.
    // loras[s]: sequence s's LoRA adapter (lora_add's index), -1 none; nullptr: none for all.
    status forward_batch(const ops_context& ctx, const int32_t* ids, const int64_t* n_tokens, int64_t n_seq,
                         kv_cache* const* caches, float* logits, const bool* all_logits = nullptr,
                         const int32_t* loras = nullptr);

    // LoRA adapters (model/lora.h, docs/lora.md): an adapter loaded for this model's hparams is
    // added and gets the next index (0, 1, ...); a sequence names it in layer_seq::lora and every
    // linear it adapts then adds scale * (x A^T) B^T to the rows of that sequence. The weights are
    // not touched (GPTQ linears stay quantized).
    int32_t                                                 lora_add(std::shared_ptr<const lora_adapter> adapter);
    const std::vector<std::shared_ptr<const lora_adapter>>& loras() const { return loras_; }

    // LoRA training (llama_train.cpp, docs/lora.md "Fine-tuning"): the summed cross-entropy (natural
    // log) of the batch's targets with adapter `lora` (lora_add's index, -1 none) applied, and with
    // grads set, d(grad_scale * loss)/dA and /dB of that adapter added into grads (an adapter of the
    // same shapes). The base weights are frozen. Gradient checkpointing: the forward keeps each
    // layer's input only; the backward recomputes one layer at a time from it. globals_load first.
    // dropout: the LoRA branches' (p in [0, 1)), applied whether or not grads are asked for.
    result<double> lora_loss_grad(const ops_context& ctx, const train_batch& batch, int32_t lora, lora_adapter* grads,
                                  float grad_scale, lora_dropout_spec dropout = {});

    // Whether n_tokens more tokens after n_past cached ones cross LongRoPE's switch from short to
    // long factors with keys rotated by the short ones in the cache (then the whole sequence is run
    // again, here and in llama_cuda_model).
    bool rope_needs_reprefill(int64_t n_past, int64_t n_tokens) const;

private:
    llama_model() = default;
    // The two blocks of layer_forward (llama_layer.cpp), each adding its output to hidden (the
    // residual); false when the call stopped at stop_after. attention_block: input norm, q/k/v,
    // RoPE, cache, attention, o. mlp_block: post-attention norm, gate/up, SiLU * up, down.
    bool attention_block(const ops_context& ctx, const llama_layer& layer, float* hidden,
                         std::span<const layer_seq> seqs, const linear_input_hook* hook, linear_input stop_after) const;
    bool mlp_block(const ops_context& ctx, const llama_layer& layer, float* hidden, std::span<const layer_seq> seqs,
                   const linear_input_hook* hook, linear_input stop_after) const;
    // The sparse MoE block in mlp_block's place (llama_moe.cpp): post-attention norm, router, the
    // experts over their routed tokens, the shared expert, the weighted sum, residual.
    bool moe_block(const ops_context& ctx, const llama_layer& layer, float* hidden, int64_t n_rows,
                   const linear_input_hook* hook, linear_input stop_after, const moe_input_hook* moe_hook) const;
    // y[rows, n_out] = linear r of the layer on x[rows, n_in], plus each sequence's LoRA product.
    void linear_run(const ops_context& ctx, const llama_layer& layer, linear_role r, std::span<const layer_seq> seqs,
                    const float* x, float* y) const;
    // The same for several linears of one input (q/k/v, gate/up): GPTQ ones through one
    // op_gptq_linears call (the input rounded to int8 once), ys[i] the output of roles[i].
    void linears_run(const ops_context& ctx, const llama_layer& layer, std::span<const linear_role> roles,
                     std::span<const layer_seq> seqs, const float* x, float* const* ys) const;
    // Each sequence's LoRA product of linear r added to y (nothing without adapters).
    void lora_run(const ops_context& ctx, const llama_layer& layer, linear_role r, std::span<const layer_seq> seqs,
                  const float* x, float* y) const;
    // Training (llama_train.cpp): one layer recomputed from its input x0 [n_rows, n_embd] and back-
    // propagated: dh holds dL/d(layer output) and becomes dL/d(x0); LoRA gradients into grads.
    void layer_backward(const ops_context& ctx, const llama_layer& layer, const float* x0,
                        std::span<const layer_seq> seqs, float* dh, const lora_adapter* adapter,
                        lora_adapter* grads) const;
    // dx (+)= dy W of linear r, plus its LoRA product's: dx += s (dy B) A, gB += s dy^T (x A^T), gA += s (dy B)^T x.
    void lora_linear_backward(const ops_context& ctx, const llama_layer& layer, linear_role r, int64_t n_rows,
                              const float* x, const float* dy, float* dx, bool accumulate, const lora_adapter* adapter,
                              lora_adapter* grads) const;
    // Summed NLL of the rows with a target; with dh, dL/d(hidden) * grad_scale of final norm + lm_head.
    double output_loss_grad(const ops_context& ctx, const float* hidden, const int32_t* targets, int64_t n_rows,
                            float grad_scale, float* dh) const;
    // dx[n, n_embd] = dlogits[n, n_vocab] W_lm_head.
    void lm_head_backward_input(const ops_context& ctx, const float* dlogits, float* dx, int64_t n) const;
    // Embeddings of ids, then every layer over the batch: hidden[sum n_tokens, n_embd].
    status        layers_run(const ops_context& ctx, const int32_t* ids, std::span<const layer_seq> seqs,
                             std::vector<float>* hidden);
    model_config  cfg_;
    llama_hparams hp_;
    std::unique_ptr<tensor_source>                   src_;
    std::optional<gptq_config>                       gptq_;
    std::map<std::string, gptq_config, std::less<>>  gptq_modules_;  // quantized module -> its settings
    std::vector<std::unique_ptr<llama_layer>>        layers_;
    std::vector<float>                               embed_;    // [n_vocab, n_embd]; empty when embed16_ is set
    std::vector<uint16_t>                            embed16_;  // the same in F16 bits (keep_f16, F16 checkpoint)
    bool                                             keep_f16_ = false;
    std::vector<float>                               norm_;     // [n_embd]
    linear_weights                                   lm_head_;  // [n_vocab, n_embd] dense or GPTQ; empty when tied
    std::vector<std::shared_ptr<const lora_adapter>> loras_;
    lora_dropout_spec dropout_;  // LoRA dropout during lora_loss_grad (p 0 otherwise: inference never drops)
};

}  // namespace gptq
