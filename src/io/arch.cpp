#include "io/arch.h"

#include <vector>

#include "core/error.h"

namespace gptq {

namespace {

arch_desc row(const char* architecture, const char* model_type, model_family family, int64_t max_pos) {
    arch_desc d{};
    d.architecture          = architecture;
    d.model_type            = model_type;
    d.family                = family;
    d.default_max_positions = max_pos;
    return d;
}

// One row per family; unset fields keep arch_desc's defaults (= Llama). Facts from transformers
// 5's modeling_<family>.py / configuration_<family>.py.
std::vector<arch_desc> make_table() {
    std::vector<arch_desc> t;
    t.push_back(row("LlamaForCausalLM", "llama", model_family::MODEL_FAMILY_LLAMA, 2048));

    arch_desc mistral = row("MistralForCausalLM", "mistral", model_family::MODEL_FAMILY_MISTRAL, 32768);
    mistral.window    = arch_window_rule::WINDOW_ALL;  // every layer when config.json gives a window
    t.push_back(mistral);

    arch_desc qwen2       = row("Qwen2ForCausalLM", "qwen2", model_family::MODEL_FAMILY_QWEN2, 32768);
    qwen2.qkv_bias_always = true;  // q/k/v biased, o not
    qwen2.window          = arch_window_rule::WINDOW_FROM_MAX_LAYER;
    t.push_back(qwen2);

    arch_desc qwen3 = row("Qwen3ForCausalLM", "qwen3", model_family::MODEL_FAMILY_QWEN3, 32768);
    qwen3.qk_norm          = true;  // per-head RMSNorm on q and k before RoPE; biases only with attention_bias
    qwen3.default_head_dim = 128;   // Qwen3Config.head_dim
    qwen3.window    = arch_window_rule::WINDOW_FROM_MAX_LAYER;
    t.push_back(qwen3);

    arch_desc phi3     = row("Phi3ForCausalLM", "phi3", model_family::MODEL_FAMILY_PHI3, 4096);
    phi3.fused_qkv     = true;  // self_attn.qkv_proj
    phi3.fused_gate_up = true;  // mlp.gate_up_proj
    phi3.rope_longrope = true;
    phi3.window        = arch_window_rule::WINDOW_ALL;
    t.push_back(phi3);
    return t;
}

const std::vector<arch_desc>& k_archs() {
    static const std::vector<arch_desc> t = make_table();
    return t;
}

}  // namespace

const char* mlp_activation_name(mlp_activation a) {
    switch (a) {
        case mlp_activation::ACT_SILU:
            return "silu";
        case mlp_activation::ACT_GELU_TANH:
            return "gelu_pytorch_tanh";
    }
    return "?";
}

const arch_desc* arch_find_architecture(const std::string& architecture) {
    for (const auto& d : k_archs())
        if (architecture == d.architecture) return &d;
    return nullptr;
}

const arch_desc* arch_find_model_type(const std::string& model_type) {
    for (const auto& d : k_archs())
        if (model_type == d.model_type) return &d;
    return nullptr;
}

const arch_desc& arch_of(model_family f) {
    for (const auto& d : k_archs())
        if (d.family == f) return d;
    GPTQ_ASSERT(false && "model_family missing from the arch table");
    return k_archs()[0];
}

const char* model_family_name(model_family f) {
    return arch_of(f).model_type;
}

std::string arch_supported_list() {
    std::string s;
    for (const auto& d : k_archs()) s += (s.empty() ? "" : ", ") + std::string(d.architecture);
    return s;
}

}  // namespace gptq
