// The one seam between the engine's flows (ppl, generate, bench, serve) and a backend that runs a
// model: a model_session owns the weights on its device and a set of sequence slots, each with its
// own KV cache, and runs ragged steps over any subset of them. CPU (model_session_cpu.cpp, over
// llama_model) and CUDA (model_session_cuda.cpp, over llama_cuda_model) implement it; a build
// without CUDA opens the CUDA one as the "built without CUDA" error of device_check, so callers
// need no #ifdef. docs/engine.md describes it, and which step shapes each backend runs.
//
//     GPTQ_ASSIGN_OR_RETURN(auto s, model_session_open({.model_path = dir, .device = dev}));
//     GPTQ_TRY(s->reserve(/*n_seq=*/2, /*n_ctx=*/512));
//     seq_step steps[] = {{.seq = 0, .ids = p0, .n_tokens = 7}, {.seq = 1, .ids = p1, .n_tokens = 3}};
//     GPTQ_TRY(s->step(steps, logits.data()));       // [2, n_vocab]: each sequence's last token
//     seq_step next[]  = {{.seq = 0, .ids = &t0, .n_tokens = 1}, {.seq = 1, .ids = &t1, .n_tokens = 1}};
//     GPTQ_TRY(s->step(next, logits.data()));        // decode: one token each, positions may differ
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "gptq/device.h"
#include "gptq/lora.h"
#include "model/llama.h"
#include "ops/logits_top.h"

namespace gptq {

struct model_session_options {
    std::string model_path;
    device_spec device;             // cpu (threads) or cuda:N
    int         n_threads = 0;      // CPU: 0 = all cores
    bool        strict    = false;  // unused tensors are an error (llama_open_options::strict)
    // CPU: GPTQ linears of step() (generation: prompts and decode rows alike) take int8-rounded
    // activations (ops_context::int8_activations); false: F32 products everywhere. evaluate()
    // (perplexity) is always F32.
    bool int8_activations = true;
    // CPU: the KV cache holds F16 keys and values (half the bytes and half the decode attention's
    // reads; rounded when stored: docs/model-runtime.md "KV cache"); false: F32.
    bool kv_f16 = true;
    // CUDA: the context the KV cache is allocated and the placement planned for at open (0: the
    // model's default, llama_cuda_options::n_ctx); reserve() grows it when asked for more.
    int64_t n_ctx_hint = 0;
    // CUDA: positions per page of the paged KV cache (a power of two; docs/cuda.md "KV pages").
    int64_t kv_page_size = 16;
    // CUDA only: --device-map / --max-memory placement (gptq/plan.h plan_for_device); both empty:
    // everything on the GPU. Otherwise the plan is printed to stderr and its cpu modules offloaded.
    std::string device_map, max_memory;
    // CPU: host memory the caller's own work needs beside the weights (ppl: one window's
    // activations), checked with the weights at open before any weight is read (host_memory.h),
    // and the advice of that out-of-memory error ("lower --seqlen ...").
    uint64_t    host_work_bytes = 0;
    std::string host_work_hint;
    // LoRA adapters (docs/lora.md): with lora_stack all of them summed as adapter 0 (ppl, generate,
    // bench), else adapter k = loras[k] (serve: chosen per sequence). A step uses one by
    // seq_step::lora; none unless asked.
    std::vector<lora_spec> loras;
    bool                   lora_stack = true;
};

// Sequence slots the CUDA session holds at most (llama_cuda.h k_llama_cuda_max_seq).
constexpr int64_t k_cuda_session_max_seq = 256;

// One sequence's part of a step: n_tokens >= 1 new tokens ids[n_tokens] that follow the sequence's
// pos() cached positions (pos advances by n_tokens). all_logits: the step writes the logits of
// every one of its tokens (n_tokens rows), else of its last token only (one row). lora: the
// session's LoRA adapter its tokens run with (0 .. lora_names().size() - 1), -1 none.
struct seq_step {
    int64_t        seq        = 0;
    const int32_t* ids        = nullptr;
    int64_t        n_tokens   = 0;
    bool           all_logits = false;
    int32_t        lora       = -1;
};

// Per-op GPU time of the decode steps run while profiling (model/llama_cuda.h llama_op_profile).
struct gpu_op_profile {
    struct op_time {
        std::string op;
        int64_t     calls = 0;
        double      ms    = 0;
    };
    int64_t              passes = 0, tokens = 0;
    double               pass_ms = 0;
    std::vector<op_time> ops;
};

class model_session {
public:
    virtual ~model_session() = default;

    virtual const llama_hparams& hparams() const = 0;
    virtual const llama_model&   model() const   = 0;  // config, tokenizer path, GPTQ settings
    int64_t                      n_vocab() const { return hparams().n_vocab; }
    std::string                  weights() const;     // "float16", "gptq-4bit-g128", "gptq-4bit-g128-act"
    virtual std::string          device() const = 0;  // "cpu", "cuda:0"
    // What runs the model, for logs and bench's `machine`: the CPU's model and core count; the GPU
    // device with its weights and KV cache (MiB) and what is offloaded.
    virtual std::string describe() const  = 0;
    virtual int         n_threads() const = 0;  // host threads running the model's compute; 0 on a GPU
    // Whether step() takes any ragged batch (sequences at different positions, different token
    // counts, all_logits anywhere): the CPU. False: the lockstep shapes of docs/engine.md only
    // (CUDA), and a step of another shape is a STATUS_UNSUPPORTED error naming it.
    virtual bool ragged() const = 0;

    // Make room for n_seq sequence slots 0 .. n_seq-1 of up to n_ctx positions each; every
    // sequence starts empty (pos 0); n_seq 0 drops every slot. Errors when the memory does not
    // fit, naming what was asked (nothing is then reserved).
    virtual status  reserve(int64_t n_seq, int64_t n_ctx) = 0;
    virtual int64_t n_seq() const                         = 0;
    virtual int64_t n_ctx() const                         = 0;
    // A paged KV cache (CUDA, docs/cuda.md "KV pages"): reserve(n_seq, n_ctx) with a pool of
    // n_pages pages of kv_page_size() positions that the slots share as they grow (each up to
    // n_ctx); n_pages 0 is reserve(n_seq, n_ctx), every slot's full context. A step that needs more
    // pages than are free is an error naming both, with nothing advanced. A backend without pages
    // (the CPU: one cache of n_ctx positions per slot) ignores n_pages and reserves every slot's
    // full context; kv_page_size() 0 says so.
    virtual status reserve_paged(int64_t n_seq, int64_t n_ctx, int64_t n_pages) {
        (void)n_pages;
        return reserve(n_seq, n_ctx);
    }
    virtual int64_t kv_page_size() const { return 0; }    // positions per page; 0: not paged
    virtual int64_t kv_pages_total() const { return 0; }  // pages in the pool
    virtual int64_t kv_pages_used() const { return 0; }   // pages holding some slot's positions
    // Bytes of K and V of every layer for one cached position of one sequence (the KV cache's
    // element type: F32 on the CPU, F16 on the GPU), for memory plans such as serve's.
    virtual uint64_t kv_bytes_per_position() const = 0;
    // Forget sequence seq (its cache is overwritten from position 0 on); an unknown slot: nothing.
    virtual void    seq_reset(int64_t seq)     = 0;
    virtual int64_t seq_pos(int64_t seq) const = 0;  // -1 for an unknown slot

    // One forward pass over a ragged batch: each listed sequence (at most once per step) runs its
    // new tokens; logits[rows, n_vocab] F32, rows in the order of `steps` (see seq_step). Errors
    // (nothing advanced): an unknown slot, a repeated one, n_tokens < 1, positions past n_ctx, a
    // token id outside the vocabulary (steps_check), and a shape the backend does not run.
    virtual status step(std::span<const seq_step> steps, float* logits) = 0;

    // step() with each row's k most likely tokens and softmax normalisers instead of its logits
    // (ops/logits_top.h; serve samples on them, sampler::sample_top): every seq_step's all_logits
    // must be false (one row per step, in their order); inv_temp[steps.size()] (or nullptr) is each
    // row's 1 / temperature for logits_top::sum_exp_t. Until the next step, step_row_logits(row)
    // gives a row's whole logits [n_vocab] (for the rows the candidates do not decide). The CPU
    // selects them on the host; CUDA on the GPU, where the logits stay.
    virtual status step_top(std::span<const seq_step> steps, int64_t k, const float* inv_temp, logits_top* out);
    virtual status step_row_logits(int64_t row, float* logits);

    // Before serving: run the step shapes a server will run so that none pays a first-time cost
    // mid-traffic (CUDA: activations grown to a prompt chunk of max_chunk tokens, then the decode
    // step of every batch size 1 .. max_batch captured as a graph). Every slot is empty after.
    // Returns how many shapes it ran (0: the backend needs none, the CPU).
    virtual result<int64_t> warm_up(int64_t max_batch, int64_t max_chunk) {
        (void)max_batch, (void)max_chunk;
        return int64_t(0);
    }

    // Perplexity-style evaluation: the logits of every token of ids[n] run as a fresh sequence
    // without touching any slot (local K/V), logits[n, n_vocab]. CUDA: every slot must be empty
    // (the GPU runs it in sequence 0's cache).
    // lora: the adapter the tokens run with, -1 none.
    virtual status evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora = -1) = 0;

    // The LoRA adapters loaded (model_session_options::loras), by index: their names (the folder
    // names; a stack's joined with "+").
    const std::vector<std::string>& lora_names() const { return lora_names_; }

    // Memory (bench's peak_memory_bytes): the CPU, the process's peak RSS since memory_reset_peak
    // (VmHWM); the GPU, the device bytes the model holds now (weights, KV caches, activations,
    // staging: they only grow, and memory_reset_peak does nothing).
    virtual uint64_t    memory_used() const = 0;
    virtual void        memory_reset_peak() = 0;
    virtual std::string memory_kind() const = 0;  // "host_rss", "device_allocated"
    // Memory the backend could still allocate (KV caches: serve's plan): the host's available memory
    // (CPU), the device's free memory (CUDA); 0 when unknown.
    virtual uint64_t memory_available() const = 0;
    // Weights offloaded to pinned host memory (CUDA --device-map / --max-memory); 0 otherwise.
    virtual uint64_t offload_bytes() const { return 0; }

    // Op-level GPU timing (bench --profile-ops; CUDA only, elsewhere STATUS_UNSUPPORTED): while on,
    // decode steps run uncaptured with an event after each op; turning it on clears the profile.
    virtual status         profile_ops(bool on);
    virtual gpu_op_profile decode_profile() const { return {}; }

protected:
    std::vector<std::string> lora_names_;
    std::vector<float>       top_logits_;  // step_top's logits (the host path)
    int64_t                  top_rows_ = 0;
    // lora is -1 or a loaded adapter; `where` starts the message.
    status lora_check(int32_t lora, const std::string& where) const;
    // The checks every backend makes before a step runs (the errors listed at step()).
    status steps_check(std::span<const seq_step> steps) const;
    // ids[n] are all in the vocabulary; `where` starts the message ("evaluate").
    status ids_check(const int32_t* ids, int64_t n, const std::string& where) const;
};

// The device, the placement flags (--device-map / --max-memory need a GPU) and the thread count;
// model_session_open runs it first, and a flow may call it before its own slow work.
status model_session_check(const model_session_options& options);

// Opens the model on options.device: the CPU reads every layer (after a host memory check), the
// GPU uploads them.
result<std::unique_ptr<model_session>> model_session_open(const model_session_options& options);

// The two backends (model_session_open picks one; options already checked).
result<std::unique_ptr<model_session>> model_session_open_cpu(const model_session_options& options);
result<std::unique_ptr<model_session>> model_session_open_cuda(const model_session_options& options);

}  // namespace gptq
