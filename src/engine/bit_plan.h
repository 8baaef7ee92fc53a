// --target-bpw (docs/quantize.md, "Mixed precision"): the choice of bits and group size per
// unit of checkpoint modules that minimises the summed error under an exact size budget.
// Pure bookkeeping: the errors are measured by quantize.cpp (--bpw-sensitivity: the output's KL
// with the unit alone quantized, or the Hessian-weighted error; additive either way); the
// bytes are those the checkpoint writes for the module (qweight, qzeros, scales, g_idx:
// gptq_linear_decls), bias not counted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace gptq {

struct bit_choice {
    int      bits       = 4;
    int      group_size = 128;
    uint64_t bytes      = 0;    // bytes written for the module at these settings
    double   error      = 0.0;  // its measured error (sum over the module's parts), what the plan minimises
    // GPTQ's Hessian-weighted error (the sum over the parts; reported): `error` itself with
    // --bpw-sensitivity hessian, beside the output's KL with --bpw-sensitivity output. Not read by the solver.
    double hessian_error = 0.0;
};

// One unit of the plan: the checkpoint modules that take one choice together. vLLM loads a
// layer's q/k/v as one fused linear (qkv_proj) and gate/up as one (gate_up_proj), each with the
// quantization of the `dynamic` rule that matches the fused name, so those share a choice; every
// other module is a unit of its own (docs/quantize.md, "Mixed precision").
struct bit_plan_module {
    std::string              module;   // "model.layers.3.mlp.down_proj", "lm_head", "model.layers.3.self_attn.qkv_proj"
    std::vector<std::string> members;  // the checkpoint modules it covers (empty: `module` alone)
    int64_t                  n_out = 0, n_in = 0;  // n_out summed over the members
    std::vector<bit_choice>  choices;
    double                   signal = 0.0;  // the module's output energy tr(W H W^T) (for relative errors)
};

struct bit_plan {
    std::vector<size_t> pick;              // per module, the index of its chosen choice
    uint64_t            bytes        = 0;  // sum of the picks' bytes (<= budget_bytes)
    uint64_t            budget_bytes = 0;
    double              error        = 0.0;  // sum of the picks' errors
    int64_t             n_weights    = 0;    // sum of n_out * n_in
    double              bpw() const { return n_weights ? 8.0 * double(bytes) / double(n_weights) : 0.0; }
};

// Bytes a GPTQ module of this shape and these settings writes: qweight I32 [n_in * bits / 32,
// n_out], qzeros I32 [G, n_out * bits / 32], scales F16 [G, n_out], g_idx I32 [n_in] (format.md 1.2).
uint64_t gptq_module_bytes(int64_t n_out, int64_t n_in, int bits, int group_size);

// The budget of target_bpw bits per weight over these modules, in whole bytes (rounded down).
uint64_t bit_plan_budget_bytes(const std::vector<bit_plan_module>& modules, double target_bpw);

// The plan: the smallest choice of every module first (an error naming the smallest possible bpw
// when even that does not fit), then upgrades along each module's lower convex hull of (bytes,
// error) in order of error saved per byte while they fit, then a local search: the best single
// move (a module to any choice of lower error that fits the bytes left) or pair of moves (one
// module up, another down to free the bytes) until none lowers the error. The result is within
// budget, and no single module can move to a lower-error choice within the bytes left (tested).
result<bit_plan> bit_plan_solve(const std::vector<bit_plan_module>& modules, uint64_t budget_bytes);

}  // namespace gptq
