// GPTQ's calibration side behind one interface (docs/quantize.md, "The calibration runner"): the
// hidden states of the calibration windows, the passes of one decoder layer over them with the
// hooks GPTQ needs (the Hessians of its linears' inputs), the per-linear solve and error, and the
// pass that turns the layer's outputs into the next layer's inputs. engine/quantize.cpp drives it
// layer by layer and knows nothing of the device:
//
//     GPTQ_ASSIGN_OR_RETURN(auto run, calibration_runner_cpu(model, ctx, n_samples, seqlen, std::move(x)));
//     for each layer:  run->layer_begin(layer)
//         for each group of linears (true-sequential):  run->hessians_collect(layer, group)
//             for each linear r of the group:  h = run->hessian(input of r); q = run->solve(w, h, ...)
//                 run->weighted_error(w, wq) ...; run->linear_update(r, wq); layer.linear_replace(r, wq)
//         run->layer_forward(layer)   // the windows now hold the quantized layer's outputs
//
// CPU (calibration.cpp): llama_model::layer_forward window by window in F32 (hooks, stop_after),
// hessian_accumulator, gptq_quantize, hessian_weighted_error: the oracle. CUDA
// (calibration_cuda.cpp, --device cuda): model/llama_cuda_layer.h's runner over F16 activations
// kept on the GPU, cuda_hessian_accumulator, gptq_quantize_cuda, hessian_weighted_error_cuda. A
// build without CUDA opening the CUDA runner gets device_check's "built without CUDA" error.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "gptq/device.h"
#include "model/llama.h"
#include "ops/ops.h"
#include "quant/gptq.h"

namespace gptq {

class calibration_runner {
public:
    virtual ~calibration_runner() = default;

    // Start a layer: its current weights (dense F32 linears) are those the passes below use.
    virtual status layer_begin(const llama_layer& layer) = 0;
    // layer_begin with F16 copies of the dense linears made ahead (quantize.cpp's reader thread):
    // w16[r] = f32_to_f16 of layer.linear(r).w, every value in the F16 range and widening back
    // exactly; an empty entry: none made. The GPU runner uploads them without converting; the
    // default (the CPU) is layer_begin(layer).
    virtual status layer_begin_f16(const llama_layer& layer, const std::vector<std::vector<uint16_t>>& w16) {
        (void)w16;
        return layer_begin(layer);
    }
    // Run the layer over every window until the last input the group's linears read has been seen,
    // and accumulate the Hessian of each such input (those of an earlier call are dropped). The
    // windows' hidden states are unchanged.
    virtual status hessians_collect(const llama_layer& layer, const std::vector<linear_role>& group) = 0;
    // The Hessian [n_in, n_in] F32 of an input collected by the last hessians_collect (the
    // accumulator is kept: the same input may be asked for again). It becomes the H of
    // weighted_error.
    virtual result<std::vector<float>> hessian(linear_input in) = 0;
    // gptq_quantize (quant/gptq.h) on this runner's device: the same inputs, result and errors.
    virtual result<quantized_linear> solve(const float* w, int64_t n_out, int64_t n_in, const std::vector<float>& h,
                                           const gptq_options& opt, gptq_stats* stats) = 0;
    // hessian_weighted_error of w against wq with the H of the last hessian() call (h: its host copy).
    virtual result<double> weighted_error(const float* w, const float* wq, int64_t n_out, int64_t n_in,
                                          const std::vector<float>& h) = 0;
    // A linear of the current layer replaced by w [n_out, n_in] (its dequantized GPTQ weight): later
    // passes over this layer see it. The caller replaces it in its llama_layer too.
    virtual status linear_update(linear_role r, const std::vector<float>& w) = 0;
    // Run the layer (with the weights given by layer_begin and linear_update) over every window:
    // its outputs become the windows' hidden states, the next layer's inputs.
    virtual status layer_forward(const llama_layer& layer) = 0;

    // ---- Device-resident linears (docs/quantize.md "Issue 18: overlap and device-resident linears") ----
    // A runner that keeps H, W and the codes on its device between the Hessian, the solve, the
    // errors and the update: resident() true, and quantize.cpp calls these instead of hessian /
    // solve / weighted_error / linear_update for a dense layer's linears (same results: the same
    // H, codes and errors as those four). The CPU runner has none (resident() false; the defaults
    // below are errors).
    virtual bool resident() const { return false; }
    // hessian(in) kept on the device only (computed once per input after a hessians_collect:
    // q/k/v and gate/up ask for the same one).
    virtual status hessian_keep(linear_input in);
    // solve() of role r's weight w (the current layer's, as layer_begin got it) against the kept
    // H; W's device copy and the result's codes stay for the calls below.
    virtual result<quantized_linear> solve_kept(linear_role r, const float* w, int64_t n_out, int64_t n_in,
                                                const gptq_options& opt, gptq_stats* stats);
    // weighted_error of the last solve_kept's W against q (nullptr: that solve's own result).
    virtual result<double> weighted_error_kept(const quantized_linear* q);
    // linear_update(r, dequantized result of the last solve_kept), dequantized on the device.
    virtual status linear_update_kept(linear_role r);

    // ---- Mixture of experts (a MoE layer's sparse block; docs/quantize.md "Mixture of experts") ----
    // Run the layer over every window until every expert's `in` (LINEAR_INPUT_GATE_UP or
    // LINEAR_INPUT_DOWN) has been seen, with the real routing, and accumulate per expert the Hessian
    // of that input over the tokens routed to it (the shared expert: every token). GATE_UP also
    // keeps the Hessian of the block's input over every token, and the tokens each expert got.
    // route_all[e] (DOWN): expert e's down input is computed for every token (act(gate(x)) * up(x)
    // with its current gate/up) instead of its routed ones. Hessians of an earlier call of the same
    // input are dropped. The windows' hidden states are unchanged. Both runners have them.
    virtual status moe_hessians_collect(const llama_layer& layer, linear_input in, const std::vector<bool>& route_all);
    // The Hessian of expert e's `in` (k_moe_shared: the shared expert) from the last collect of that
    // input; all_tokens (GATE_UP): the one over every token (route-all, the shared expert).
    virtual result<std::vector<float>> moe_hessian(linear_input in, int64_t expert, bool all_tokens);
    // Calibration tokens routed to each expert [n_expert] by the last GATE_UP collect.
    virtual std::vector<int64_t> moe_token_counts() const { return {}; }

    // ---- GPTAQ (--gptaq; docs/quantize.md "GPTAQ"): the full-precision model's hidden states of
    // the same windows carried beside the quantized model's (twice the activations' memory). Only
    // the CPU runner has them (two_streams() true when opened with them); the defaults are errors.
    virtual bool two_streams() const { return false; }
    // The current layer's full-precision weights (copied: the caller goes on to replace its
    // linears): the full-precision stream runs through them. Called before layer_begin, each layer.
    virtual status layer_begin_fp(const llama_layer& layer);
    // With two streams, hessians_collect also accumulates per input the cross term
    // dXXT = (2/n) sum (x_fp - x_q) x_q^T (quant/gptq.h cross_accumulator), x_fp the input of the
    // same linear in the full-precision layer over the full-precision stream; layer_forward runs
    // both streams. The cross term of an input collected by the last hessians_collect:
    virtual result<std::vector<float>> cross_term(linear_input in);
    // gptaq_quantize (quant/gptq.h) on this runner's device.
    virtual result<quantized_linear> solve_gptaq(const float* w, int64_t n_out, int64_t n_in,
                                                 const std::vector<float>& h, const std::vector<float>& dxxt,
                                                 const gptq_options& opt, gptq_stats* stats);

    // The Hessian [n_embd, n_embd] F32 of lm_head's input, the final norm of the windows' hidden
    // states (call it after the last layer_forward: --quantize-lm-head). Like hessian(), it becomes
    // the H of weighted_error; the layer Hessians of the last hessians_collect are dropped.
    virtual result<std::vector<float>> final_norm_hessian() = 0;
    // Wait for the work queued so far (phase timing); nothing to do on the CPU.
    virtual status synchronize() { return status::ok(); }
    // Device memory the runner planned for (the report's peak_plan_bytes); 0 on the CPU.
    virtual uint64_t device_plan_bytes() const { return 0; }
    // The most device memory in use seen at a synchronize() (the whole device); 0 on the CPU.
    virtual uint64_t device_used_peak() const { return 0; }
    // Seconds of the runner's own sub-steps for the report's detail_seconds (none on the CPU).
    virtual std::vector<std::pair<std::string, double>> detail_seconds() const { return {}; }
};

// GPTQ_QUANTIZE_PLAIN=1 in the environment: quantize as before issue 18 (no reader / writer
// threads, no device-resident linears), to compare the two in one run (scripts/device/gptq7b.sh).
bool quantize_plain_mode();

// x: [n_samples * seqlen, n_embd] F32, the embedded calibration windows (taken). x_fp (GPTAQ):
// the same windows embedded by the full-precision model (x itself unless the embeddings are
// quantized), the full-precision stream; empty: one stream.
result<std::unique_ptr<calibration_runner>> calibration_runner_cpu(const llama_model& model, const ops_context& ctx,
                                                                   int64_t n_samples, int64_t seqlen,
                                                                   std::vector<float> x, std::vector<float> x_fp = {});
// The same on the GPU dev (device_check first): prints the device memory plan and refuses it when
// the device has less free memory, then keeps x there as F16. pool: host threads for conversions.
result<std::unique_ptr<calibration_runner>> calibration_runner_cuda(const device_spec& dev, const llama_model& model,
                                                                    const ops_context& ctx, thread_pool* pool,
                                                                    int64_t n_samples, int64_t seqlen,
                                                                    std::vector<float> x);

}  // namespace gptq
