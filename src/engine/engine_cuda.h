// The GPU side of the engine's flows (ppl, generate), behind an interface that builds without
// CUDA too (every call then returns the "built without CUDA" error of device_check), so that
// ppl.cpp and generate.cpp need no #ifdef.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "gptq/device.h"
#include "gptq/ppl.h"

namespace gptq {

// Where the modules live: --device-map / --max-memory (gptq/plan.h plan_for_device). Both empty:
// everything on the GPU. Otherwise the plan is printed to stderr and its cpu modules are offloaded.
struct gpu_placement_flags {
    std::string device_map;
    std::string max_memory;
    bool        any() const { return !device_map.empty() || !max_memory.empty(); }
};

// --device-map / --max-memory with --device cpu: an error (they place modules for the GPU runtime).
status gpu_placement_check(const device_spec& dev, const gpu_placement_flags& flags);

// Per-op GPU time of the forward passes run while profiling (model/llama_cuda.h llama_op_profile).
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

// One sequence on the GPU model (model/llama_cuda.h): prefill, decode steps, reset.
class gpu_session {
public:
    // n_ctx: KV-cache positions (0: the model's default).
    static result<std::unique_ptr<gpu_session>> open(const std::string& model_path, const device_spec& dev,
                                                     int64_t n_ctx = 0, const gpu_placement_flags& placement = {});
    ~gpu_session();
    int64_t n_vocab() const;
    status  context_reserve(int64_t n_ctx);  // grows the cache (resets the sequence)
    void    reset();
    // logits: [n, n_vocab] when all_logits, else the last token's [n_vocab] (F32).
    status prefill(const int32_t* ids, int64_t n, float* logits, bool all_logits);
    status decode(int32_t id, float* logits);
    // Several sequences in lockstep (llama_cuda_model::sequences_reserve / prefill_batch /
    // decode_batch): logits of each sequence's last token, [n_seq, n_vocab].
    status      sequences_reserve(int64_t n_seq);
    status      prefill_batch(const int32_t* ids, int64_t n_seq, int64_t n, float* logits);
    status      decode_batch(const int32_t* ids, int64_t n_seq, float* logits);
    uint64_t    device_bytes() const;   // weights + KV cache + activations + staging
    uint64_t    offload_bytes() const;  // weights offloaded to pinned host memory
    std::string describe() const;       // "cuda:0 (NVIDIA H100 ...), weights ... MiB, ..."
    // Op-level timing (llama_cuda_model::set_profile_ops): on resets the profiles; decode steps
    // then run uncaptured with an event after each op.
    void           set_profile_ops(bool on);
    gpu_op_profile decode_profile() const;
    gpu_op_profile prefill_profile() const;

private:
    gpu_session();
    struct impl;
    std::unique_ptr<impl> impl_;
};

// Perplexity windows of `ids` on the GPU (the protocol of model/perplexity.h); fills the
// evaluation fields of r (r's dataset fields are the caller's). t_load: when loading started.
result<ppl_result> ppl_evaluate_cuda(const ppl_params& params, const device_spec& dev, const std::vector<int32_t>& ids,
                                     ppl_result r, std::chrono::steady_clock::time_point t_load);

}  // namespace gptq
