// The sparse MoE block of the one GPU decoder layer (GPTQ_CUDA builds only; Mixtral, Qwen2-MoE,
// Qwen3-MoE): what llama_moe.cpp does on the CPU, over F16 activations on the device. Called by
// cuda_layer_forward in place of the dense MLP on a MoE layer. docs/cuda.md ("Mixture of experts").
//
// Router: dense F16 weights (a GPTQ router is dequantized at load), logits F32 (cuBLAS, F32 out),
// then softmax + top-k (+ renormalisation) in one kernel (op_cuda_moe_topk). Two ways to run the
// experts, with the same sums:
// - per expert (prefill, and decode when the experts cannot run grouped): the routing is copied to
//   the host, the tokens are grouped by expert (rows ascending, as moe_route), their rows gathered,
//   each active expert's gate, up and down run over its rows with the ordinary linears (dense F16 or
//   GPTQ, any kernel), and the weighted sum reads each token's rows back. A host sync per layer: not
//   capturable, so a model whose decode takes this path decodes without the CUDA graph.
// - grouped (a ragged decode pass when every expert of a projection is on the fast int4 layout with
//   one shape and group size, or every one dense F16): each (token, slot) pair times its expert,
//   read on the device from the routing, one launch per projection; the decode step stays a graph.
// Both end in op_cuda_moe_combine: the token's experts in ascending expert order (F32), plus
// sigmoid(shared_expert_gate(x)) * shared_expert(x) (Qwen2-MoE), rounded once to F16 into buffers.y.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/llama.h"
#include "model/llama_cuda_layer.h"
#include "ops/ops_cuda_moe.h"

namespace gptq {

// A SwiGLU expert on the device: gate, up [ff, n_embd], down [n_embd, ff].
struct cuda_moe_expert {
    cuda_linear gate, up, down;
};

// A MoE layer's block on the device.
struct cuda_moe_weights {
    cuda_linear                  router;  // [n_expert, n_embd] dense F16
    std::vector<cuda_moe_expert> experts;
    cuda_moe_expert              shared;       // Qwen2-MoE's shared expert; n_out 0 when none
    cuda_linear                  shared_gate;  // [1, n_embd] dense F16; empty when none
    // The grouped kernels' view of gate, up, down (tables on the device); `grouped` false when some
    // projection cannot run grouped, with the reason (mixed dense / GPTQ experts, the generic GPTQ
    // kernel, differing group sizes).
    std::array<cuda_moe_grouped_args, 3> proj;
    std::array<cuda_buffer, 3>           tables;
    bool                                 grouped = false;
    std::string                          why_not_grouped;

    uint64_t bytes() const;  // device memory held
};

// Loads one checkpoint module (its .weight, or its GPTQ tensors) as llama_cuda_model does; with
// dense_only, a GPTQ module is dequantized to a dense F16 one.
using cuda_module_loader =
    std::function<status(const std::string& module, int64_t n_out, int64_t n_in, bool dense_only, cuda_linear* out)>;

// Layer i_layer's router, experts, shared expert and its gate (hp.is_moe(i_layer)).
result<std::unique_ptr<cuda_moe_weights>> cuda_moe_load(const llama_hparams& hp, int64_t i_layer,
                                                        const cuda_module_loader& load);

// The calibration runner's copy: the block of a host layer (dense F32 linears) as dense F16 linears
// into *out (its buffers reused when the sizes match; no grouped tables: calibration runs per
// expert). upload: F32 -> F16 into a device buffer, range-checked (llama_cuda_layer_runner's).
using cuda_f16_upload = std::function<status(const std::vector<float>& v, const std::string& name, cuda_buffer* out)>;
status cuda_moe_upload_dense(const llama_hparams& hp, const llama_layer& layer, const cuda_f16_upload& upload,
                             cuda_moe_weights* out);

// The MoE block's activations for up to n tokens (reserve grows them; llama_cuda_model sizes them
// with its other activations, so their addresses are fixed for the decode graphs).
struct cuda_moe_buffers {
    int64_t              n = 0;
    cuda_buffer          logits;          // [n, n_expert] F32 router logits
    cuda_buffer          ids;             // [n, k] I32 chosen experts
    cuda_buffer          weights;         // [n, k] F32 their weights
    cuda_buffer          rows, pos;       // [n k] I32 (per-expert path): gathered row a's token; pair p's gathered row
    cuda_buffer          xg;              // [n k, n_embd] F16: gathered inputs (per expert) / permuted inputs (grouped)
    cuda_buffer          gate, up;        // [n k, ff] F16: the experts' gate and up outputs; act(gate) * up into gate
    cuda_buffer          out;             // [n k, n_embd] F16: the experts' down outputs
    cuda_buffer          sh_gate;         // [n, ff_shared] F16 shared expert (when the model has one)
    cuda_buffer          sh_up;           // [n, ff_shared] F16
    cuda_buffer          sh_out;          // [n, n_embd] F16
    cuda_buffer          sh_logit;        // [n] F32 shared_expert_gate
    cuda_buffer          ra_gate, ra_up;  // [n, ff] F16: a route-all expert over every row (calibration only)
    std::vector<int32_t> host_ids, host_rows, host_pos;  // the per-expert path's routing on the host

    // route_all: also the route-all buffers (the calibration runner's).
    status   reserve(const llama_hparams& hp, int64_t n_tokens, bool route_all = false);
    uint64_t bytes() const;
};

// The block over p.n rows: hidden += buffers.y (o's output), the post-attention norm into buffers.x,
// router, top-k, the experts (grouped when p.moe_grouped and w.moe->grouped), the shared expert,
// the weighted sum into buffers.y (added by the next layer's norm, as the dense MLP's down output).
// Needs w.moe and b.moe. Calibration (p.hook, p.moe_hook, p.stop_after GATE_UP / DOWN): per expert,
// the hooks see the block input and each expert's inputs; returns false when stopped.
result<bool> cuda_moe_block(cuda_context& c, const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* hidden,
                            const cuda_layer_buffers& b, const cuda_layer_pass& p);

}  // namespace gptq
