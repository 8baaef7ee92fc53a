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

    arch_desc qwen3        = row("Qwen3ForCausalLM", "qwen3", model_family::MODEL_FAMILY_QWEN3, 32768);
    qwen3.qk_norm          = true;  // per-head RMSNorm on q and k before RoPE; biases only with attention_bias
    qwen3.default_head_dim = 128;   // Qwen3Config.head_dim
    qwen3.window           = arch_window_rule::WINDOW_FROM_MAX_LAYER;
    t.push_back(qwen3);

    arch_desc phi3     = row("Phi3ForCausalLM", "phi3", model_family::MODEL_FAMILY_PHI3, 4096);
    phi3.fused_qkv     = true;  // self_attn.qkv_proj
    phi3.fused_gate_up = true;  // mlp.gate_up_proj
    phi3.rope_longrope = true;
    phi3.window        = arch_window_rule::WINDOW_ALL;
    t.push_back(phi3);

    // Gemma 2 (modeling_gemma2.py): RMSNorm by (1 + w), sandwich norms (post_attention_layernorm is
    // on attention's output; pre_/post_feedforward_layernorm around the MLP), GeGLU with the tanh
    // GELU ("hidden_activation"), embeddings times sqrt(hidden_size), attention scale
    // query_pre_attn_scalar^-0.5, attention and final logit soft-capping, sliding window on every
    // other layer (0, 2, ...), head_dim 256 and tied embeddings by default.
    arch_desc gemma2                     = row("Gemma2ForCausalLM", "gemma2", model_family::MODEL_FAMILY_GEMMA2, 8192);
    gemma2.norms                         = {.attn_in  = "input_layernorm",
                                            .attn_out = "post_attention_layernorm",
                                            .mlp_in   = "pre_feedforward_layernorm",
                                            .mlp_out  = "post_feedforward_layernorm"};
    gemma2.default_head_dim              = 256;
    gemma2.tie_default                   = true;
    gemma2.norm_plus_one                 = true;
    gemma2.embed_scale                   = true;
    gemma2.act_key                       = "hidden_activation";
    gemma2.act_default                   = "gelu_pytorch_tanh";
    gemma2.window                        = arch_window_rule::WINDOW_LAYER_TYPES;
    gemma2.default_query_pre_attn_scalar = 256;
    gemma2.reads_attn_softcap            = true;
    gemma2.default_attn_softcap          = 50.0;
    gemma2.reads_final_softcap           = true;
    gemma2.default_final_softcap         = 30.0;
    gemma2.default_window_pattern        = 2;
    t.push_back(gemma2);

    // Gemma 3 text (modeling_gemma3.py, Gemma3ForCausalLM): Gemma 2's layer plus q/k norms, no
    // attention soft-capping (the key is ignored, as transformers does), final soft-capping only when
    // given, 5 local : 1 global layers by default, and a RoPE per layer type (local base 10000,
    // global 1e6 with the config's scaling).
    arch_desc gemma3                = gemma2;
    gemma3.architecture             = "Gemma3ForCausalLM";
    gemma3.model_type               = "gemma3_text";
    gemma3.family                   = model_family::MODEL_FAMILY_GEMMA3;
    gemma3.default_max_positions    = 131072;
    gemma3.qk_norm                  = true;
    gemma3.reads_attn_softcap       = false;
    gemma3.default_attn_softcap     = 0;
    gemma3.default_final_softcap    = 0;
    gemma3.default_window_pattern   = 6;
    gemma3.window_pattern_key       = "sliding_window_pattern";
    gemma3.rope_by_layer_type       = true;
    gemma3.default_rope_theta       = 1000000.0;
    gemma3.default_rope_local_theta = 10000.0;
    t.push_back(gemma3);

    // Mixtral (modeling_mixtral.py): Mistral's attention (window on every layer when given) and a
    // sparse MoE block on every layer: block_sparse_moe.gate, experts.<e>.w1 (gate) / w3 (up) /
    // w2 (down) of intermediate_size, top-k weights always renormalised.
    arch_desc mixtral = row("MixtralForCausalLM", "mixtral", model_family::MODEL_FAMILY_MIXTRAL, 131072);
    mixtral.window    = arch_window_rule::WINDOW_ALL;
    mixtral.moe       = {.block         = "block_sparse_moe",
                         .router        = "gate",
                         .expert_gate   = "w1",
                         .expert_up     = "w3",
                         .expert_down   = "w2",
                         .n_experts_key = "num_local_experts",
                         .n_experts_alt = "num_experts",
                         .ff_key        = "intermediate_size",
                         .renorm_always = true};
    t.push_back(mixtral);

    // Qwen2-MoE (modeling_qwen2_moe.py): Qwen2's attention (q/k/v bias from "qkv_bias", default
    // true), mlp.gate + mlp.experts.<e>.{gate,up,down}_proj of moe_intermediate_size, a shared
    // expert (shared_expert_intermediate_size) times sigmoid(mlp.shared_expert_gate), top-k weights
    // renormalised when norm_topk_prob; dense MLP (intermediate_size) on mlp_only_layers and off
    // decoder_sparse_step.
    arch_desc qwen2_moe    = row("Qwen2MoeForCausalLM", "qwen2_moe", model_family::MODEL_FAMILY_QWEN2_MOE, 32768);
    qwen2_moe.window       = arch_window_rule::WINDOW_FROM_MAX_LAYER;
    qwen2_moe.qkv_bias_key = "qkv_bias";
    qwen2_moe.moe          = {.block         = "mlp",
                              .n_experts_key = "num_experts",
                              .n_experts_alt = "num_local_experts",
                              .shared_expert = true,
                              .sparse_step   = true};
    t.push_back(qwen2_moe);

    // Qwen3-MoE (modeling_qwen3_moe.py): Qwen3's attention (q/k norms) and Qwen2-MoE's block
    // without the shared expert. transformers 5 saves the expert count as num_local_experts,
    // transformers 4 as num_experts.
    arch_desc qwen3_moe = row("Qwen3MoeForCausalLM", "qwen3_moe", model_family::MODEL_FAMILY_QWEN3_MOE, 32768);
    qwen3_moe.qk_norm   = true;  // head_dim: hidden_size / heads when absent (Qwen3MoeConfig has none)
    qwen3_moe.window    = arch_window_rule::WINDOW_FROM_MAX_LAYER;
    qwen3_moe.moe       = {
              .block = "mlp", .n_experts_key = "num_experts", .n_experts_alt = "num_local_experts", .sparse_step = true};
    t.push_back(qwen3_moe);
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
