// The architectures gptqkit knows, one description per family: how config.json names it, which
// checkpoint tensors it has and under which names, and which blocks and options of the one
// decoder layer it uses. Everything family-specific lives in this table (arch.cpp); config parsing
// (hf_config.cpp), the tensor table and forward (model/llama*.cpp, both backends) and the
// quantizer read it. The forward tests options (model/llama.h llama_hparams), never families.
// docs/architectures.md lists what each family supports and how it was checked.
//
// It lives in io/ (data only, no compute) because config parsing, below model/, needs it.
#pragma once

#include <cstdint>
#include <string>

namespace gptq {

enum class model_family : uint8_t {
    MODEL_FAMILY_LLAMA,
    MODEL_FAMILY_MISTRAL,
    MODEL_FAMILY_QWEN2,
    MODEL_FAMILY_QWEN3,
    MODEL_FAMILY_PHI3,
    MODEL_FAMILY_GEMMA2,
    MODEL_FAMILY_GEMMA3,  // Gemma3ForCausalLM (text only, model_type gemma3_text)
    MODEL_FAMILY_MIXTRAL,
    MODEL_FAMILY_QWEN2_MOE,
    MODEL_FAMILY_QWEN3_MOE,
};

// The sparse MoE block of a family (docs/architectures.md "Mixture of experts"): a router linear
// (never quantized), top-k of the softmax of its logits, SwiGLU experts, and optionally a shared
// expert with a sigmoid gate. Checkpoint names relative to "model.layers.<i>.<block>.", as
// transformers saves them and GPTQModel writes them (one linear per expert, never stacked).
struct arch_moe_desc {
    const char* block         = nullptr;                  // "block_sparse_moe" (Mixtral), "mlp" (Qwen); nullptr: no MoE
    const char* router        = "gate";                   // <block>.gate.weight [n_expert, n_embd]
    const char* expert_gate   = "gate_proj";              // <block>.experts.<e>.<name>: Mixtral w1
    const char* expert_up     = "up_proj";                // Mixtral w3
    const char* expert_down   = "down_proj";              // Mixtral w2
    const char* n_experts_key = "num_experts";            // Mixtral, Qwen3-MoE (transformers 5): num_local_experts
    const char* n_experts_alt = nullptr;                  // the other spelling also accepted
    const char* ff_key        = "moe_intermediate_size";  // Mixtral: intermediate_size
    bool        renorm_always = false;  // top-k weights divided by their sum (Mixtral); else norm_topk_prob
    bool shared_expert = false;  // <block>.shared_expert.{gate,up,down}_proj + <block>.shared_expert_gate (Qwen2-MoE)
    bool sparse_step   = false;  // decoder_sparse_step / mlp_only_layers pick the MoE layers (Qwen)
};

// How a layer's sliding window is chosen (config.json "sliding_window" gives its size).
enum class arch_window_rule : uint8_t {
    WINDOW_NONE,            // full attention everywhere; "sliding_window" is ignored (Llama, Phi-3 as transformers)
    WINDOW_ALL,             // every layer (Mistral)
    WINDOW_FROM_MAX_LAYER,  // layers >= max_window_layers when use_sliding_window (Qwen2, Qwen3)
    WINDOW_LAYER_TYPES,     // "layer_types": "sliding_attention" / "full_attention" per layer (Gemma 2/3)
};

// MLP activation of gate (the GLU's gated half): act(gate) * up.
enum class mlp_activation : uint8_t {
    ACT_SILU,       // "silu"
    ACT_GELU_TANH,  // "gelu_pytorch_tanh" (tanh-approximated GELU)
};
const char* mlp_activation_name(mlp_activation a);

// Checkpoint names of a layer's norms relative to "model.layers.<i>."; nullptr where the family has
// none. attn_in: before attention; attn_out: on attention's output before the residual add
// (sandwich); mlp_in: before the MLP; mlp_out: on the MLP's output before the residual add.
struct arch_norm_names {
    const char* attn_in  = "input_layernorm";
    const char* attn_out = nullptr;
    const char* mlp_in   = "post_attention_layernorm";
    const char* mlp_out  = nullptr;
};

struct arch_desc {
    const char*  architecture;  // config.json "architectures"[0]: "Qwen3ForCausalLM"
    const char*  model_type;    // config.json "model_type": "qwen3"
    model_family family;
    int64_t      default_max_positions;  // transformers' config default when the key is absent
    int64_t      default_head_dim = 0;   // head_dim when config.json omits it; 0: hidden_size / heads

    // Checkpoint layout.
    arch_norm_names norms;
    bool            qk_norm         = false;  // self_attn.q_norm / k_norm [head_dim], per head before RoPE
    bool            fused_qkv       = false;  // self_attn.qkv_proj [q_dim + 2 kv_dim, n_embd] (rows q, k, v)
    bool            fused_gate_up   = false;  // mlp.gate_up_proj [2 n_ff, n_embd] (rows gate, up)
    bool            qkv_bias_always = false;  // q/k/v biased and o never, whatever attention_bias says (Qwen2)
    bool            tie_default     = false;  // tie_word_embeddings when config.json omits it

    // Options of the forward, read from config.json where it has them (hf_config.cpp).
    bool             norm_plus_one = false;         // RMSNorm scales by (1 + w) (Gemma)
    bool             embed_scale   = false;         // embeddings scaled by sqrt(hidden_size) (Gemma)
    const char*      act_key       = "hidden_act";  // Gemma: "hidden_activation"
    const char*      act_default   = "silu";
    arch_window_rule window        = arch_window_rule::WINDOW_NONE;
    bool             rope_longrope = false;  // accepts rope type longrope / su (Phi-3)

    // Gemma. The attention scale is query_pre_attn_scalar^-0.5, with this default when config.json
    // omits the key; 0: the family has no such key and the scale is 1 / sqrt(head_dim).
    double default_query_pre_attn_scalar = 0;
    // Tanh soft-capping from config.json ("attn_logit_softcapping", "final_logit_softcapping"; null
    // = off), read only where transformers' forward applies it (its Gemma 3 ignores the attention
    // one), with transformers' default when the key is absent (Gemma 2: 50 and 30).
    bool   reads_attn_softcap    = false;
    double default_attn_softcap  = 0;
    bool   reads_final_softcap   = false;
    double default_final_softcap = 0;
    // WINDOW_LAYER_TYPES when config.json has no "layer_types": layer i is full attention when
    // (i + 1) % pattern == 0, else sliding (Gemma 2: 2; Gemma 3: "sliding_window_pattern", else 6).
    int64_t     default_window_pattern = 0;
    const char* window_pattern_key     = nullptr;
    // RoPE per layer type (Gemma 3): transformers 5 "rope_parameters" {"full_attention": {...},
    // "sliding_attention": {...}}; transformers 4 "rope_theta" + "rope_scaling" for the full-attention
    // layers and "rope_local_base_freq" (default RoPE) for the sliding ones. Defaults: these thetas.
    bool   rope_by_layer_type       = false;
    double default_rope_theta       = 10000.0;
    double default_rope_local_theta = 10000.0;

    // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); moe.block == nullptr for dense families.
    arch_moe_desc moe;
    // config.json key that says whether q/k/v carry a bias (Qwen2-MoE "qkv_bias", default true; o
    // never); nullptr: attention_bias / qkv_bias_always decide.
    const char* qkv_bias_key = nullptr;
};

// The table; nullptr when unknown.
const arch_desc* arch_find_architecture(const std::string& architecture);
const arch_desc* arch_find_model_type(const std::string& model_type);
const arch_desc& arch_of(model_family f);
const char*      model_family_name(model_family f);  // its model_type: "qwen3"
std::string      arch_supported_list();              // "LlamaForCausalLM, MistralForCausalLM, ..."

}  // namespace gptq
