// LoRA adapters at inference (issue 21, docs/lora.md): PEFT's adapter format read onto a model's
// linears, applied unmerged (the base stays as loaded, GPTQ linears quantized):
//
//     y = base(x) + scale * (x A^T) B^T        A: [r, n_in], B: [n_out, r] per adapted linear
//
// scale = user_scale * lora_alpha / r (use_rslora: lora_alpha / sqrt(r)). An adapter is a
// model-level add-on: llama_model holds the loaded ones (lora_add) and the layer adds each row's
// adapter after the linear (llama_layer.cpp); the rows of a ragged batch may use different
// adapters (layer_seq::lora). The GPU holds its own copy (llama_cuda.h).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/llama.h"
#include "ops/ops.h"

namespace gptq {

// One adapted linear: r == 0 when the adapter leaves it alone.
struct lora_module {
    int64_t            r     = 0;
    float              scale = 0.0f;  // user scale * alpha / r (or / sqrt(r)); 1 for a stack with folded scales
    std::vector<float> a;             // [r, n_in]  lora_A
    std::vector<float> b;             // [n_out, r] lora_B (the role's rows of a fused module)
};

struct lora_adapter {
    std::string name;  // what serve's clients send as "model": the folder's name
    std::string path;  // the folder
    std::vector<std::array<lora_module, k_n_linear_roles>> layers;  // [n_layer]

    const lora_module* module(int64_t i_layer, linear_role r) const {  // nullptr: not adapted
        const lora_module& m = layers[static_cast<size_t>(i_layer)][static_cast<size_t>(r)];
        return m.r > 0 ? &m : nullptr;
    }
    int64_t  n_modules() const;  // adapted linears over all layers
    uint64_t bytes() const;      // F32 A and B held
};

// Reads PEFT's adapter folder (adapter_config.json + adapter_model.safetensors) for a model of
// hparams hp, scale multiplied by user_scale. Errors name the file, the field or tensor and the
// value: not LoRA (peft_type), use_dora, bias != "none", lora_bias, modules_to_save,
// rank_pattern / alpha_pattern, a target or tensor naming a module the model does not have, a
// layer past the model's, shapes that do not match the model or r, a module with lora_A but not
// lora_B (or the reverse), non-finite values, no adapted module at all.
result<lora_adapter> lora_adapter_load(const std::string& dir, const llama_hparams& hp, float user_scale);

// One adapter equal to the sum of `parts` (several --lora on ppl/generate/bench): per linear the
// ranks are concatenated, A = [A1; A2], B = [s1 B1, s2 B2] with scale 1 (a linear only one part
// adapts keeps that part's A, B and scale). Name: the parts' names joined with "+".
lora_adapter lora_adapters_stack(const std::vector<lora_adapter>& parts);

// y[n_rows, n_out] += m.scale * (x[n_rows, n_in] A^T) B^T (the CPU reference of the GPU kernel).
void lora_forward(const ops_context& ctx, const lora_module& m, const float* x, float* y, int64_t n_rows, int64_t n_in,
                  int64_t n_out);

// A new trainable adapter (gptq finetune) over the roles of every layer that `targets` marks, as
// PEFT initialises one: A [r, n_in] kaiming-uniform with a = sqrt(5) (nn.Linear's default: uniform
// in +-1/sqrt(n_in)) from a 64-bit Mersenne Twister seeded with `seed`, B [n_out, r] zeros.
lora_adapter lora_adapter_init(const llama_hparams& hp, int64_t r, float scale,
                               const std::array<bool, k_n_linear_roles>& targets, uint64_t seed);

// What adapter_config.json says beyond the tensors.
struct lora_save_config {
    int64_t     r          = 0;
    double      alpha      = 0.0;
    bool        use_rslora = false;
    std::string base_model;          // base_model_name_or_path
    double      lora_dropout = 0.0;  // as trained (PEFT applies it in training only)
};
// Writes PEFT's format into the folder dir (created if missing): adapter_model.safetensors (F32
// A and B, names base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...) and then
// adapter_config.json, each to a temporary name and renamed when complete; the config comes last,
// so a folder with a config holds a complete adapter.
status lora_adapter_save(const lora_adapter& a, const llama_hparams& hp, const lora_save_config& c,
                         const std::string& dir);

// The delta of a linear's weight, W += scale * B A: w[n_out, n_in] (merge-lora).
void lora_merge_into(const lora_module& m, float* w, int64_t n_out, int64_t n_in);

}  // namespace gptq
