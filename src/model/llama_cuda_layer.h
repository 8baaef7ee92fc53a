// One Llama decoder layer on the GPU for layer-by-layer work (GPTQ_CUDA builds only): GPTQ's
// calibration passes (engine/quantize.cpp with --device cuda) run every calibration window through
// the layer being quantized, capture the inputs of its linears for the Hessians, and then run the
// quantized layer to produce the next layer's inputs. The same forward pass as
// llama_model::layer_forward without a KV cache (each window attends to itself, positions 0 ..
// seqlen-1), over F16 activations on the device, with llama_cuda_model's kernels.
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
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "model/llama.h"
#include "ops/ops_cuda.h"

namespace gptq {

// Called with the device F16 input [n_tokens, n_in] of a linear group, valid during the call only
// (queued work on the context's stream may read it: the runner does not overwrite it until the
// stream has passed the call's work, since everything is ordered on that one stream).
using cuda_linear_input_hook =
    std::function<status(linear_input which, const uint16_t* x_dev, int64_t n_tokens, int64_t n_in)>;

class llama_cuda_layer_runner {
public:
    // seqlen: tokens per window; max_chunk_tokens bounds the tokens processed at once (0: 16384).
    static result<std::unique_ptr<llama_cuda_layer_runner>> create(cuda_context& ctx, const llama_hparams& hp,
                                                                   int64_t seqlen, int64_t max_chunk_tokens = 0);

    // Upload a host layer (F32, dense linears) as F16; values beyond the F16 range are an error
    // naming the tensor.
    status load(const llama_layer& layer);
    // Replace one linear's weight by w [n_out, n_in] (F32 host, e.g. the dequantized GPTQ weight).
    status linear_update(linear_role r, const std::vector<float>& w);

    // hidden: device F16 [n_windows * seqlen, n_embd]. With stop_after == LINEAR_INPUT_COUNT the
    // layer's output replaces hidden; otherwise each window runs until the hook has seen
    // `stop_after` and hidden is left unchanged. The hook sees each chunk's inputs in turn.
    status forward(uint16_t* hidden, int64_t n_windows, const cuda_linear_input_hook* hook,
                   linear_input stop_after = linear_input::LINEAR_INPUT_COUNT);

    // Keep the attention output of n_windows windows (n_windows * seqlen * q_dim F16 on the device).
    status attention_cache_enable(int64_t n_windows);
    bool   attention_cached() const { return attn_valid_; }
    // Host threads for the F32 -> F16 conversions of load / linear_update (nullptr: one thread).
    void     set_thread_pool(thread_pool* pool) { pool_ = pool; }
    int64_t  chunk_windows() const { return chunk_windows_; }
    uint64_t device_bytes() const;  // weights + activations held

private:
    struct linear {
        int64_t     n_out = 0, n_in = 0;
        cuda_buffer w, bias;  // F16
    };
    llama_cuda_layer_runner() = default;
    status upload_f16(const std::vector<float>& v, const std::string& name, cuda_buffer* out);
    status linear_run(linear_role r, const uint16_t* x, uint16_t* y, int64_t n);

    cuda_context*                        ctx_ = nullptr;
    llama_hparams                        hp_;
    int64_t                              seqlen_ = 0, chunk_windows_ = 0, layer_index_ = -1;
    cuda_buffer                          attn_norm_, mlp_norm_;
    std::array<linear, k_n_linear_roles> lin_;
    cuda_buffer                          h_, x_, q_, k_, v_, y_, gate_, up_;  // one chunk's activations
    cuda_buffer                          cos_, sin_;                          // [seqlen, head_dim / 2] F32
    cuda_buffer                          attn_;  // [attn_windows_ * seqlen, q_dim] F16 attention output
    int64_t                              attn_windows_ = 0;
    bool                                 attn_valid_   = false;
    thread_pool*                         pool_         = nullptr;
};

}  // namespace gptq
