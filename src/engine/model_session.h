// The one seam between the engine's flows (ppl, generate, bench, serve) and a backend that runs a
// model: a model_session owns the weights on its device and a set of sequence slots, each with its
// own KV cache, and runs ragged steps over any subset of them. CPU (model_session_cpu.cpp, over
// llama_model) and CUDA (model_session_cuda.cpp, over llama_cuda_model) implement it; a build
// without CUDA opens the CUDA one as the "built without CUDA" error of device_check, so callers
// need no #ifdef. docs/engine.md describes it.
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

#include "core/status.h"
#include "gptq/device.h"
#include "model/llama.h"

namespace gptq {

struct gpu_placement_flags;  // engine_cuda.h

struct model_session_options {
    std::string model_path;
    device_spec device;           // cpu (threads) or cuda:N
    int         n_threads = 0;    // CPU: 0 = all cores
    bool        strict    = false;  // unused tensors are an error (llama_open_options::strict)
    // CUDA only: --device-map / --max-memory placement (engine_cuda.h); empty = all on the GPU.
    std::string device_map, max_memory;
};

// One sequence's part of a step: n_tokens >= 1 new tokens ids[n_tokens] that follow the sequence's
// pos() cached positions (pos advances by n_tokens). all_logits: the step writes the logits of
// every one of its tokens (n_tokens rows), else of its last token only (one row).
struct seq_step {
    int64_t        seq        = 0;
    const int32_t* ids        = nullptr;
    int64_t        n_tokens   = 0;
    bool           all_logits = false;
};

class model_session {
public:
    virtual ~model_session() = default;

    virtual const llama_hparams& hparams() const = 0;
    virtual const llama_model&   model() const   = 0;  // config, tokenizer path, GPTQ settings
    int64_t                      n_vocab() const { return hparams().n_vocab; }
    virtual std::string          device() const   = 0;  // "cpu", "cuda:0"
    virtual std::string          describe() const = 0;  // device, weights, memory, for logs

    // Make room for n_seq sequence slots 0 .. n_seq-1 of up to n_ctx positions each; every
    // sequence starts empty (pos 0). Errors when the memory does not fit, naming what was asked.
    virtual status  reserve(int64_t n_seq, int64_t n_ctx) = 0;
    virtual int64_t n_seq() const                         = 0;
    virtual int64_t n_ctx() const                         = 0;
    // Forget sequence seq (its cache is overwritten from position 0 on).
    virtual void    seq_reset(int64_t seq)     = 0;
    virtual int64_t seq_pos(int64_t seq) const = 0;

    // One forward pass over a ragged batch: each listed sequence (at most once per step) runs its
    // new tokens; logits[rows, n_vocab] F32, rows in the order of `steps` (see seq_step). Errors
    // (nothing advanced): an unknown slot, a repeated one, n_tokens < 1, positions past n_ctx, a
    // token id outside the vocabulary.
    virtual status step(std::span<const seq_step> steps, float* logits) = 0;

    // Perplexity-style evaluation: the logits of every token of ids[n] run as a fresh sequence
    // without touching any slot (local K/V), logits[n, n_vocab].
    virtual status evaluate(const int32_t* ids, int64_t n, float* logits) = 0;

    // Memory: bytes held on the device (host RSS on the CPU), and its peak since the last reset.
    virtual uint64_t    memory_used() const  = 0;
    virtual void        memory_reset_peak()  = 0;
    virtual std::string memory_kind() const  = 0;  // "host RSS", "device"
};

result<std::unique_ptr<model_session>> model_session_open(const model_session_options& options);

}  // namespace gptq
