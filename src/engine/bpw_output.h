// --bpw-sensitivity output (docs/quantize.md, "Mixed precision"): a module's sensitivity is the
// change of the model's output distribution when that module alone is quantized and the rest of
// the model stays unquantized: the mean over a few calibration windows' tokens of
// KL(p_unquantized || p_quantized) of the next-token distribution, in nats.
//
// Layer-wise: the windows' hidden states of the unquantized model are advanced one layer at a time
// in step with quantize.cpp's sensitivity pass; a variant of layer i (some of its linears replaced
// by their quantized versions) is run from layer i's cached inputs through layer i and every later
// layer (loaded again from the checkpoint, one at a time, so that the memory stays one layer and
// the variants' states) to the logits. The unquantized model's log-probabilities are computed once.
// Cost per variant: (n_layer - i) layer forwards and one lm_head over the windows' tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "model/llama.h"
#include "ops/ops.h"

namespace gptq {

// Replacement weights [n_out, n_in] F32 of some linears of one layer.
using layer_variant = std::vector<std::pair<linear_role, std::vector<float>>>;

class output_sensitivity {
public:
    // x: the embedded windows [n_windows * seqlen, n_embd] (taken). Runs the unquantized model
    // over them (every layer loaded in turn; globals_load done) and keeps the reference
    // distributions; the hidden states are then those of layer 0's input. Checks the host memory
    // (reference n_windows * seqlen * n_vocab F32, the windows, the variants' states).
    static result<std::unique_ptr<output_sensitivity>> make(const llama_model& model, const ops_context& ctx,
                                                            thread_pool* pool, int64_t n_windows, int64_t seqlen,
                                                            std::vector<float> x);

    // The mean KL of n variants of layer `layer` (whose index is the next layer to advance):
    // make(k) gives variant k's weights; the layer is given back with its own weights
    // (bit-identical). Variants run in chunks whose states fit the state budget.
    result<std::vector<double>> layer_variants(llama_layer& layer, size_t n,
                                               const std::function<result<layer_variant>(size_t)>& make);
    // The windows through `layer` as it is (unquantized): the next layer's inputs.
    status advance(const llama_layer& layer);
    // The mean KL of lm_head replaced by w [n_vocab, n_embd], on the unquantized model's final
    // hidden states (call it after the last layer's advance).
    result<double> lm_head_variant(const std::vector<float>& w);

    int64_t n_tokens() const { return n_windows_ * seqlen_; }

private:
    output_sensitivity(const llama_model& model, const ops_context& ctx, thread_pool* pool, int64_t n_windows,
                       int64_t seqlen, std::vector<float> x);
    status reference();
    void   forward(const llama_layer& layer, float* hidden) const;
    // Mean KL over the windows of the logits made by `logits(window, hidden rows, out)`.
    double kl_of(const std::function<void(int64_t, float*)>& logits) const;

    const llama_model&     model_;
    ops_context            ctx_;
    thread_pool*           pool_      = nullptr;
    int64_t                n_windows_ = 0, seqlen_ = 0;
    std::vector<float>     x_;       // [n_windows * seqlen, n_embd]: the next layer's inputs
    std::vector<float>     p_ref_;   // [n_windows * seqlen, n_vocab]: the reference probabilities
    std::vector<double>    negent_;  // [n_windows * seqlen]: sum_v p log p of each row
    std::vector<layer_seq> seqs_;    // one per window (local K/V)
};

}  // namespace gptq
