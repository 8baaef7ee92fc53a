// The Llama family (llama.h: Llama 2/3, Mistral, Qwen2) resident on one GPU (GPTQ_CUDA builds
// only): the same config, tensor table and forward pass as llama_model, over ops_cuda.h. One
// sequence at a time or many in sequence slots over a paged KV cache (a pool of pages shared by the
// slots, a page table per slot); docs/cuda.md ("The model on the GPU", "KV pages") has the memory
// layout and the CUDA-graph decode step.
//
//     GPTQ_ASSIGN_OR_RETURN(auto m, llama_cuda_model::open("models/tiny-llama", {.device = 0, .n_ctx = 512}));
//     std::vector<float> logits(n * m->hparams().n_vocab);
//     GPTQ_TRY(m->prefill(ids.data(), n, logits.data()));        // [n, n_vocab] F32
//     GPTQ_TRY(m->decode(next_id, logits.data()));                // [1, n_vocab]; graph after one step
//     m->reset();                                                  // a new sequence
//
// Numerics: weights and activations F16 (BF16 and F32 checkpoints are rounded to F16 at load),
// F32 accumulation in every kernel, logits F32 (the lm_head GEMM writes F32). GPTQ linears stay
// quantized (cuda_gptq_linear: the int4 kernel or the generic one, chosen per layer).
//
// CPU offload (options.offload, docs/multi-gpu.md): an offloaded module's device buffers are packed
// into pinned host memory at load; each forward pass copies it into one of two device staging
// buffers on a copy stream while the previous module computes (events order the two streams, and
// the CUDA graph of the decode step captures the copies too). The kernels and their order are the
// same as with the module resident, so the logits are bit-for-bit the same.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/gptq_checkpoint.h"
#include "model/device_map.h"
#include "model/kv_pages.h"
#include "model/llama.h"
#include "model/llama_cuda_layer.h"
#include "model/llama_cuda_moe.h"
#include "model/lora.h"
#include "ops/logits_top.h"
#include "ops/ops_cuda.h"

namespace gptq {

struct llama_cuda_options {
    int     device    = 0;     // CUDA device index
    int64_t n_ctx     = 0;     // KV-cache positions; 0: max_position_embeddings, at most k_llama_cuda_default_ctx
    int64_t page_size = 16;    // positions per KV page (a power of two, 1 .. 2^20; docs/cuda.md "KV pages")
    bool    graph     = true;  // replay the decode step as a CUDA graph (captured after one plain step)
    bool    gptq_fast = true;  // allow the fast int4 kernel for GPTQ layers (false: generic kernel only)
    // Fuse q/k/v into one linear [q_dim + 2 kv_dim, n_embd] and gate/up into one [2 n_ff, n_embd] at
    // load (one GEMV/GEMM each instead of 3 and 2): dense F16 always, GPTQ when the parts have the
    // same bits, group count and g_idx, and biases on all or none; otherwise they stay separate.
    // Modules stored fused in the checkpoint (Phi-3 qkv_proj, gate_up_proj) stay fused either way;
    // q/k/v of a model with q/k norms (Qwen3, Gemma 3) are never fused (the norms need q, k apart).
    bool              fuse = true;
    offload_placement offload;  // modules kept in pinned host memory and copied in when they run
    // LoRA adapters (model/lora.h, read for this model's hparams; docs/lora.md), resident on the GPU
    // as F32 factors, adapter k = loras[k]; each sequence slot runs with the one seq_lora_set gave
    // it. With adapters the linears stay unfused (each adapter adds to its own linear's output), and
    // a checkpoint that stores fused modules (Phi-3) is refused.
    std::vector<std::shared_ptr<const lora_adapter>> loras;
    // MoE layers in a decode step: the grouped expert kernels (routing read on the device, the step
    // a CUDA graph) where the experts allow them; false: per expert with the routing on the host
    // (no graph), as prefill always runs them (llama_cuda_moe.h).
    bool moe_grouped = true;
    // The fused decode step (docs/cuda.md "The fused decode step"), each part bit for bit the plain ops:
    // decode_fuse: the decode attention in one launch with RoPE and the KV-cache append inside it
    // (no rope_kv_store, no combine launch) wherever every attention launch of a pass is the decode
    // kernel; off with GPTQ_DECODE_FUSE=0 in the environment (read at open).
    // decode_fuse_gemv (with decode_fuse): passes of at most cuda::int4_gemv_fused_max_m() rows run the
    // GPTQ int4 linears with the RMSNorm folded into q/k/v and gate/up, SiLU * up into gate/up (rows
    // interleaved at load) and the residual adds into o and down. Off by default: slower than the
    // plain kernels on the H100 (session 9, docs/perf-notes.md); GPTQ_DECODE_FUSE_GEMV=1 turns it on.
    // decode_fuse_epi (with decode_fuse, without decode_fuse_gemv): the epilogue fusions alone, at
    // most 8 rows (the kernels the plain table picks there): SiLU * up in gate/up's GEMV (rows
    // interleaved at load), o's and down's outputs added to the residual stream in their GEMVs whose
    // last block also writes the next RMSNorm (the MLP's, the next resident layer's attention norm):
    // per layer 8 launches -> 5 with the norms' and SiLU's launches gone. GPTQ_DECODE_FUSE_EPI=1 / 0.
    bool decode_fuse      = true;
    bool decode_fuse_gemv = false;
    bool decode_fuse_epi  = false;
    // A 4-bit GPTQ lm_head stays on the int4 layout (F32-output GEMV, docs/cuda.md "Quantized lm_head
    // on the GPU"); false: dequantized to F16 at load and run as a dense head. GPTQ_LM_HEAD_INT4=0|1.
    bool lm_head_int4 = true;
    // Prefill passes whose GPTQ linears take dequantize + cuBLAS: the next linear dequantized on a
    // side stream while the current one computes (docs/cuda.md "Prefill: the next linear dequantized
    // ahead"). Off by default: no faster on the H100 (session 10; GPTQ_DEQUANT_AHEAD=1 turns it on).
    // Same bits either way.
    bool dequant_ahead = false;
};
constexpr int64_t k_llama_cuda_default_ctx = 4096;

// The options LoRA training opens a model with (llama_cuda_model::lora_loss_grad): linears unfused
// (each role its own weight and adapter), GPTQ layers in the generic layout (the checkpoint's
// tensors, dequantized to F32 for the products), a KV cache of 16 positions (training keeps its
// own activations), no graphs.
llama_cuda_options llama_cuda_train_options(int device = 0);
// The base's products in LoRA training: plain F32 (exact mode), TF32 tensor cores (F32 range, 10-bit
// mantissa inputs) or BF16 tensor cores (8-bit mantissa inputs); F32 accumulation in each.
enum class cuda_train_math { F32, TF32, BF16 };
struct cuda_train_state;                       // model/llama_cuda_train.cpp
constexpr int64_t k_llama_cuda_max_seq = 256;  // sequence slots (sequences_reserve)

// GPU time per op kind of the forward pass (llama_cuda_model::set_profile_ops), summed over the
// passes profiled: a timing event is recorded after each op, so an op's time runs from the end of
// the op before to its own end, and includes any wait of the GPU for the host to launch it (the
// profiled passes run uncaptured: launch gaps that the CUDA graph hides show up here).
struct llama_op_time {
    std::string op;         // "embedding", "rms_norm", "linear_qkv", "attention", "stage_wait", ...
    int64_t     calls = 0;  // over all passes
    double      ms    = 0;  // summed
};
struct llama_op_profile {
    int64_t                    passes  = 0;  // forward passes profiled
    int64_t                    tokens  = 0;  // tokens run by them
    double                     pass_ms = 0;  // GPU time from the first event to the last, summed
    std::vector<llama_op_time> ops;          // in order of first appearance
};

// One sequence's tokens in a mixed step (llama_cuda_model::step_mixed): ids[n] of slot seq after its
// cached positions; n > 1: a prompt chunk, n == 1: a decode token.
struct llama_cuda_segment {
    int64_t        seq = 0;
    const int32_t* ids = nullptr;
    int64_t        n   = 0;
};

class llama_cuda_model {
public:
    // Read config.json and the tensor table (llama_model::open, which checks every tensor), then
    // upload the weights layer by layer and allocate the KV cache.
    static result<std::unique_ptr<llama_cuda_model>> open(const std::string& path, const llama_cuda_options& o = {});
    ~llama_cuda_model();

    const llama_hparams& hparams() const { return host_->hparams(); }
    const llama_model&   host() const { return *host_; }  // config, GPTQ settings (no weights loaded)
    cuda_context&        context() { return *ctx_; }
    int64_t              n_ctx() const { return n_ctx_; }
    int64_t              n_past() const { return seq_pos_.empty() ? 0 : seq_pos_[0]; }  // slot 0's

    // Forget every sequence (every KV page back to the free list).
    void reset();
    // Make room for n_ctx positions per sequence (kv_reserve when larger, which resets every sequence;
    // a pool sized by kv_reserve's n_pages keeps its size).
    status context_reserve(int64_t n_ctx);

    // The KV cache (docs/cuda.md "KV pages"): per layer a pool of n_pages pages of page_size
    // positions shared by n_seq sequence slots (1 .. k_llama_cuda_max_seq), each with a page table of
    // up to ceil(n_ctx / page_size) pages. A slot takes pages from the free list as its positions
    // grow and gives them back at seq_reset / reset. n_pages 0: every slot's full context (n_seq x
    // ceil(n_ctx / page_size)); fewer pages are shared, and a step that needs more pages than are
    // free is an error naming both, with nothing advanced. Every sequence starts empty; buffers
    // whose size changed are reallocated (the old ones freed first).
    status  kv_reserve(int64_t n_seq, int64_t n_ctx, int64_t n_pages = 0);
    status  kv_pages_reserve(int64_t n_pages) { return kv_reserve(n_seq_, n_ctx_, n_pages); }
    int64_t page_size() const { return opts_.page_size; }
    int64_t kv_pages_total() const { return pages_.n_pages(); }
    int64_t kv_pages_free() const { return pages_.n_free(); }
    int64_t kv_pages_used() const { return pages_.n_used(); }
    // New pages slot seq needs to hold n_positions positions in all (0 when it has them; -1: no slot).
    int64_t kv_pages_needed(int64_t seq, int64_t n_positions) const {
        return seq >= 0 && seq < n_seq_ ? pages_.pages_needed(seq, n_positions) : -1;
    }

    // Run ids[n] at positions n_past .. n_past + n - 1 of slot 0 and advance it. logits: [n, n_vocab]
    // F32 when all_logits, else the last token's [n_vocab].
    status prefill(const int32_t* ids, int64_t n, float* logits, bool all_logits = true);
    // One token of slot 0 (a CUDA graph replay once warm, when options.graph); logits [n_vocab].
    status decode(int32_t id, float* logits);

    // Sequence slots, each with its own page table and position (continuous batching, docs/cuda.md
    // "Ragged decode"). sequences_reserve makes room for n_seq (1 .. k_llama_cuda_max_seq; kv_reserve
    // when larger, which resets them; with n_pages 0 last time the pool grows to every slot's full
    // context, else it keeps its size).
    status  sequences_reserve(int64_t n_seq);
    int64_t n_seq() const { return n_seq_; }
    int64_t seq_pos(int64_t seq) const { return seq >= 0 && seq < n_seq_ ? seq_pos_[size_t(seq)] : -1; }
    void    seq_reset(int64_t seq);  // forget one slot's sequence (and its adapter); an unknown slot: nothing
    // The LoRA adapter (index into options.loras, -1 none) the tokens of slot seq run with from now on.
    status  seq_lora_set(int64_t seq, int32_t lora);
    int64_t n_loras() const { return static_cast<int64_t>(opts_.loras.size()); }
    // ids[n] for slot seq after its cached positions (the prefill kernels), logits as prefill().
    status prefill_seq(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits);
    // One token for each of n distinct slots seqs[t], each at its own position: one launch of every
    // kernel for all of them (the GEMVs see m = n; attention reads each token's position and slot
    // from the step inputs), replayed as a CUDA graph per n. logits [n, n_vocab] in the order given.
    status decode_seqs(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits);
    // A mixed step (continuous batching: prompt chunks beside decode tokens; docs/cuda.md "Mixed
    // passes"): n_seg segments of distinct slots in ONE forward pass: the embedding, every linear,
    // norm and MLP (MoE: per expert) and the lm_head run once over all their tokens; attention is
    // split: each chunk (n > 1) through the prefill kernels over its slot's pages (one launch per
    // chunk), every one-token segment together in one ragged decode launch. logits [n_seg, n_vocab]:
    // each segment's last token, in the order given (nullptr: left on the device, as decode_seqs).
    // Uncaptured (no graph). A segment crossing LongRoPE's switch is an error (run it with
    // prefill_seq / decode_seqs, which re-prefill it); pages as decode_seqs: all taken before
    // anything runs, none advanced on an error.
    status step_mixed(const llama_cuda_segment* segs, int64_t n_seg, float* logits);
    // Size the activations for passes of up to n tokens now (growing them later drops every decode
    // graph: gptq serve's warm-up reserves its largest mixed step first).
    status tokens_reserve(int64_t n) { return activations_reserve(n); }
    // Lockstep shorthands over slots 0 .. n_seq-1: prefill_batch runs ids[n_seq * n] (row s: slot
    // s's prompt) with each row's last logits [n_seq, n_vocab]; decode_batch one token each.
    status prefill_batch(const int32_t* ids, int64_t n_seq, int64_t n, float* logits);
    status decode_batch(const int32_t* ids, int64_t n_seq, float* logits);
    // prefill_seq and decode_seqs with logits nullptr leave the logits on the device (not with a
    // LongRoPE switch, whose re-prefill needs them: an error). Until the next pass, these read its
    // output rows: logits_top_download their candidates for sampling (ops/logits_top.h: n_rows
    // rows, inv_temp[n_rows] host or nullptr), logits_row_download one whole row [n_vocab].
    status  logits_top_download(int64_t n_rows, int64_t k, const float* inv_temp, logits_top* out);
    status  logits_row_download(int64_t row, float* logits);
    int64_t logits_rows() const { return logits_rows_; }  // rows the last pass left on the device

    // Device memory held: weights, KV cache, activations + step inputs, the context's scratch.
    uint64_t weight_bytes() const { return weight_bytes_; }    // resident on the GPU
    uint64_t offload_bytes() const { return offload_bytes_; }  // offloaded: in pinned host memory
    uint64_t staging_bytes() const { return slots_[0].bytes() + slots_[1].bytes(); }  // device staging buffers
    int64_t  n_offloaded() const { return int64_t(units_.size()); }                   // modules offloaded
    uint64_t cache_bytes() const;  // the page pools and the page tables
    uint64_t activation_bytes() const;
    bool     graph_active() const {
            for (const auto& [n, g] : graphs_)
            if (!g.graph.empty()) return true;
        return false;
    }
    int64_t graph_replays() const { return graph_replays_; }
    int64_t n_gptq_fast() const { return n_gptq_fast_; }        // GPTQ linears on the int4 kernel
    int64_t n_gptq_generic() const { return n_gptq_generic_; }  // ... on the generic kernel
    // The lm_head is GPTQ and runs on the int4 layout (counted in n_gptq_fast), not as a dense F16 copy.
    bool    lm_head_int4() const { return lm_head_q_.quantized; }
    int64_t n_fused() const { return n_fused_; }  // fused linears (q/k/v, gate/up) over all layers
    // MoE: whether decode steps run the experts grouped (and so as CUDA graphs), and why not ("" when
    // they do or the model has no MoE layer).
    bool               moe_decode_grouped() const { return moe_grouped_; }
    const std::string& moe_why_not_grouped() const { return moe_why_not_grouped_; }

    // Op-level timing (issue #7): while on, prefill and decode record a timing event after each op
    // (step inputs upload, every op of forward_queued, staging waits when offloaded, the logits
    // download) and add the times to prefill_profile() / decode_profile(). Decode steps then run
    // uncaptured (the same kernels as the graph: the key count read from the device), so the
    // logits are bit for bit those with profiling off. Off (the default): no events, graph as usual.
    void                    set_profile_ops(bool on) { prof_on_ = on; }
    bool                    profile_ops() const { return prof_on_; }
    const llama_op_profile& prefill_profile() const { return prof_prefill_; }
    const llama_op_profile& decode_profile() const { return prof_decode_; }
    const llama_op_profile& mixed_profile() const { return prof_mixed_; }  // step_mixed's passes
    void                    profile_reset() { prof_prefill_ = prof_decode_ = prof_mixed_ = {}; }

    // LoRA training on the GPU (issue 21 Part 2; model/llama_cuda_train.cpp, docs/lora.md
    // "Fine-tuning on the GPU"): llama_model::lora_loss_grad's contract and algorithm (summed NLL of
    // the batch's targets returned; with grads, d(grad_scale * NLL)/dA, dB of `adapter` ADDED to
    // *grads, which has adapter's shapes), with `adapter` given per call (its A and B uploaded each
    // call: the optimizer updates them on the host). F32 activations on the device, each layer's
    // input kept and the layer recomputed in the backward pass; the base's products in
    // set_train_math's arithmetic (default TF32; F32: the tests' exact mode). The model must be open
    // with llama_cuda_train_options() (an error names what differs), no offload.
    // dropout: the LoRA branches' (llama.h lora_dropout_spec: the CPU's masks). pool (may be
    // nullptr): the host's copies of the factors and gradients split over it.
    result<double> lora_loss_grad(const train_batch& batch, const lora_adapter& adapter, lora_adapter* grads,
                                  float grad_scale, lora_dropout_spec dropout = {}, thread_pool* pool = nullptr);
    void           set_train_math(cuda_train_math m);
    // Log each call's GPU time per op kind (a timing event after each op; slower).
    void set_train_profile(bool on);
    // Device bytes training holds (activations, kept layer inputs, scratch, adapter and gradients).
    uint64_t train_bytes() const;

private:
    using linear = cuda_linear;
    struct layer : cuda_layer_weights {
        cuda_buffer k_cache, v_cache;  // page pools [n_pages][page_size][kv_dim] F16
    };

    llama_cuda_model() = default;
    status load_weights();
    status linear_load(int64_t i_layer, linear_role r, linear* out);
    // A checkpoint module [n_out, n_in] (+ bias) as stored: GPTQ (as the checkpoint's quantization
    // of it says) or dense F16. dense_only: a GPTQ module dequantized to dense F16 (MoE routers).
    status module_load(const std::string& name, int64_t n_out, int64_t n_in, bool bias, bool dense_only, linear* out);
    // A norm weight [len] as F16 ((1 + w) in F32 first with hp.norm_plus_one).
    status norm_upload(const std::string& name, int64_t len, cuda_buffer* out);
    // A module stored fused in the checkpoint (Phi-3 qkv_proj / gate_up_proj, the one holding role
    // `first`), uploaded whole as the fused linear: dense F16 or GPTQ.
    status fused_module_load(int64_t i_layer, linear_role first, linear* out);
    // RoPE tables of a step: hp.rope, and hp.rope_local when it differs (Gemma 3's local layers).
    int64_t rope_tables() const { return hparams().rope_local_differs ? 2 : 1; }
    // The token ids of each sequence's cached positions (LongRoPE runs them again when a sequence
    // crosses original_max_position_embeddings, as llama_model::forward does).
    void   ids_append(int64_t seq, const int32_t* ids, int64_t n);
    status seq_check(int64_t seq) const;
    // Run slot seq's cached tokens and then ids[n] again from position 0, with the logits the call
    // that asked would give (all_logits: of the n new tokens).
    status reprefill(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits);
    // decode_seqs once its pages are taken (they go back when it fails).
    status decode_run(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits);
    // decode_run once no sequence crosses LongRoPE's switch: the ragged pass, as a graph per n.
    // Every step entry point takes its sequences' KV pages first (pages_.grow / grow_all, as
    // prefill_seq and decode_seqs do): the kernels write and read only pages a table holds.
    status decode_step(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits);
    // The linears `roles` of layer i_layer: fused into *fused when options.fuse and they can be (see
    // llama_cuda_options::fuse), else each into its own entry of *lin.
    // out_perm (GPTQ fused parts only): the fused output's features reordered within each part,
    // feature i of a part = the part's feature out_perm[i]; *permuted says whether it was applied.
    status linear_group_load(int64_t i_layer, const std::vector<linear_role>& roles, linear* fused,
                             std::array<linear, k_n_linear_roles>* lin, const std::vector<int32_t>* out_perm = nullptr,
                             bool* permuted = nullptr, int64_t interleave = 0, int64_t* interleaved = nullptr);
    // A GPTQ linear read by io (gptq_linear_read), packed again and uploaded; group_size: its own
    // (llama_model::quantization_of, GPTQModel's `dynamic` may differ between modules).
    status gptq_upload(const gptq_linear_data& d, int group_size, const std::string& name, linear* out);
    // gptq_upload's device part: packed again and loaded (cuda_gptq_linear_load), nothing counted.
    result<cuda_gptq_linear> gptq_device_load(const gptq_linear_data& d, int group_size, const std::string& name);
    // A GPTQ lm_head ("lm_head": true): on the int4 layout into lm_head_q_ when it loads there (4 bits,
    // options.gptq_fast, the layout's conditions), else lm_head_upload_dequantized: dequantized to F16
    // at load into lm_head_, then used as a dense one.
    status lm_head_upload_quantized(const gptq_config& qc);
    status lm_head_upload_dequantized(const gptq_config& qc);
    status embed_table_upload(cuda_buffer* out);
    status tensor_upload_f16(const tensor_spec& t, cuda_buffer* out);
    // The adapters' factors and per-layer slot tables (options.loras) onto the device.
    status loras_upload();
    status activations_reserve(int64_t n_tokens);
    // Upload ids, positions, slots (tok_pos_, tok_seq_) and the RoPE rows (for lengths tok_len_)
    // of a step's n tokens, and the page table entries set since the last upload.
    status step_inputs_upload(const int32_t* ids, int64_t n);
    // prefill_seq once its pages are taken (they go back when it fails).
    status prefill_run(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits);
    // step_mixed once its pages are taken (they go back when it fails).
    status mixed_run(const llama_cuda_segment* segs, int64_t n_seg, float* logits);
    // A mixed pass's rows: the chunks' (cuda_layer_pass::chunks), the decode rows from decode_row0;
    // the logits rows are gathered by the step inputs' out-row indices.
    struct mixed_rows {
        std::vector<cuda_attention_chunk> chunks;
        int64_t                           decode_row0 = 0;
    };
    // The whole forward pass on the uploaded inputs (embedding, cuda_layer_forward per layer, final
    // norm, lm_head); logits of rows [n - n_out_rows, n) to logits_. A plain pass runs in slot seq's
    // cache from its position; ragged: token t is one query of slot tok_seq_[t] (graph-safe decode);
    // mixed (ragged too): attention split as `mixed` says, the n_out_rows logits rows those the
    // step inputs' out-row indices name.
    status forward_queued(int64_t n, int64_t n_out_rows, int64_t seq, bool ragged, const mixed_rows* mixed = nullptr);
    status logits_download(int64_t n_rows, float* logits);
    // Profiling (no-ops when off): prof_begin clears the timeline and marks the start; prof_mark
    // marks the end of op `op`; prof_end waits for the last mark and adds the intervals to *p.
    status prof_begin();
    status prof_mark(const char* op);
    status prof_end(llama_op_profile* p, int64_t n_tokens);

    // CPU offload. A unit is one offloaded module: its buffers laid out one after another (256-byte
    // aligned) in pinned host memory, copied whole into staging slot (unit index % 2); its
    // cuda_buffers are views into that slot (same offsets), so the forward pass reads them as usual.
    struct offload_unit {
        std::string               name;     // "model.layers.3"
        std::vector<cuda_buffer*> targets;  // the module's non-empty buffers
        std::vector<size_t>       offsets, sizes;
        cuda_host_buffer          host;
    };
    // Move a loaded module's buffers to pinned host memory (freeing the device copies); *unit: its index.
    status offload_module(const std::string& name, const std::vector<cuda_buffer*>& bufs, int* unit);
    status offload_finish();  // staging slots, copy stream, events; the units' buffers become slot views
    // Around each module in forward_queued (unit -1: resident, nothing to do): stage_begin queues the
    // first two copies; stage_wait makes the compute stream wait for unit u's copy; stage_done marks
    // its slot free and queues the copy of unit u + 2 into it.
    status stage_begin();
    status stage_copy(int u);
    status stage_wait(int u);
    status stage_done(int u);

    std::unique_ptr<llama_model>      host_;
    std::unique_ptr<cuda_context>     ctx_;
    llama_cuda_options                opts_;
    int64_t                           n_ctx_ = 0;
    int64_t                           n_seq_ = 1;          // sequence slots, each a page table (pages_)
    std::vector<int64_t>              seq_pos_;            // [n_seq] positions cached per slot
    std::vector<std::vector<int32_t>> seq_ids_;            // [n_seq] ids of the cached positions (ids_append)
    std::vector<int64_t>              tok_pos_, tok_len_;  // a step's tokens: position, sequence length
    std::vector<int32_t>              tok_seq_;            // ... and slot
    std::vector<int32_t>              seq_lora_;           // [n_seq] each slot's LoRA adapter (-1 none)
    std::vector<cuda_buffer>          lora_factors_;       // every adapter's A and B, F32
    uint64_t                          lora_bytes_ = 0;
    std::vector<layer>                layers_;
    cuda_buffer                       embed_, norm_, lm_head_;  // [n_vocab, n_embd], [n_embd], lm_head or empty (tied)
    // A GPTQ lm_head on the int4 layout (quantized: true; lm_head_ then empty), run by
    // op_cuda_gptq_linear_f32_out.
    cuda_linear lm_head_q_;
    uint64_t    weight_bytes_ = 0;

    std::vector<offload_unit>  units_;       // execution order
    std::vector<int>           layer_unit_;  // per layer: its unit, or -1 when resident
    int                        embed_unit_ = -1, norm_unit_ = -1, lm_head_unit_ = -1;
    uint64_t                   offload_bytes_ = 0;
    std::array<cuda_buffer, 2> slots_;  // staging: the largest unit each (one when a single unit)
    cuda_stream                copy_stream_;
    cuda_event                 start_;  // compute stream reached the pass: slots of the last pass are free
    std::array<cuda_event, 2>  copied_, freed_;

    // The paged KV cache (docs/cuda.md "KV pages"): the layers' pools are layer::k_cache / v_cache.
    kv_page_table pages_;                   // the pool's free list and the slots' page tables (host)
    bool          pages_explicit_ = false;  // the pool size was asked for (kv_reserve's n_pages)
    cuda_buffer   page_table_;              // device I32 [n_seq_][pages_.max_pages()]

    // Activations for up to n_act_ tokens per call (grown on demand).
    int64_t          n_act_ = 0;
    cuda_buffer      hidden_, x_, q_, k_, v_, y_, gate_, up_;  // [n, n_embd|q_dim|kv_dim|n_ff] F16
    cuda_buffer      logits_;                                  // [n, n_vocab] F32
    cuda_moe_buffers moe_buf_;                                 // the MoE block's activations (MoE models)
    bool             moe_grouped_ = false;                     // MoE decode steps grouped (graph-capturable)
    std::string      moe_why_not_grouped_;
    int64_t          logits_rows_ = 0;  // rows of logits_ the last pass wrote
    // logits_top_download: device [rows, 2] F64 sums, [rows, k] F32 values, [rows, k] I32 ids, [rows] F32
    // inv_temp; the host copy of the first three.
    cuda_buffer          top_dev_;
    std::vector<uint8_t> top_host_;
    // Step inputs: [n_act_] I32 ids, [n_act_] I32 positions, [n_act_] I32 slots, [n_act_] I32 LoRA adapters,
    // [n_act_] I32 out rows (mixed passes: the rows whose logits are wanted), then (at step_rope_offset_) F32 cos
    // and sin [n_act_, head_dim / 2] each, per RoPE table (rope_tables()). Uploaded per call from step_host_.
    cuda_buffer          step_;
    size_t               step_rope_offset_ = 0;
    std::vector<uint8_t> step_host_;

    // The decode step's CUDA graphs, one per token count; each keeps the context's scratch and
    // zeroed workspace of its capture (a reallocation since means capturing again).
    struct step_graph {
        cuda_graph graph;
        bool       warm    = false;  // one plain step has sized the scratch
        void*      scratch = nullptr;
        void*      zeroed  = nullptr;
    };
    std::map<int64_t, step_graph> graphs_;
    int64_t                       graph_replays_ = 0;
    int64_t                       n_gptq_fast_ = 0, n_gptq_generic_ = 0, n_fused_ = 0;
    bool                          any_qkv_fused_ = false, any_gate_up_fused_ = false;  // activation sizes

    bool                     prof_on_ = false;
    cuda_timeline            prof_tl_;
    std::vector<const char*> prof_ops_;  // the op each mark after the first ends
    llama_op_profile         prof_prefill_, prof_decode_, prof_mixed_;

    // LoRA training (lora_loss_grad): its device buffers, sized by the largest batch so far.
    std::shared_ptr<cuda_train_state> train_;
    status                            train_check() const;
    status                            train_layer(int64_t i_layer, const float* x0, float* out, float* dh);
    status train_loss(int64_t n, const std::vector<int32_t>& targets, float grad_scale, bool grad, double* loss);
    status train_profile_log(std::chrono::steady_clock::time_point t0, std::chrono::steady_clock::time_point t_up);
};

}  // namespace gptq
