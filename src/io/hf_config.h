// Hugging Face config.json / generation_config.json parsed into typed structs.
//
// Both config dialects are read: transformers 4 (torch_dtype, top-level rope_theta/rope_scaling)
// and transformers 5 (dtype, rope_parameters {rope_theta, rope_type, ...}). The supported families
// are the rows of io/arch.h (which also says which keys each reads); anything else is rejected by
// name. A GPTQ checkpoint's quantization_config is parsed by gptq_config.h.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/arch.h"
#include "io/json_file.h"

namespace gptq {

enum class rope_type : uint8_t { ROPE_DEFAULT, ROPE_LINEAR, ROPE_DYNAMIC, ROPE_LLAMA3, ROPE_LONGROPE };
const char* rope_type_name(rope_type t);

struct rope_config {
    rope_type type                             = rope_type::ROPE_DEFAULT;
    double    theta                            = 10000.0;
    double    factor                           = 1.0;  // linear, dynamic, llama3
    double    low_freq_factor                  = 1.0;  // llama3
    double    high_freq_factor                 = 4.0;  // llama3
    int64_t   original_max_position_embeddings = 0;    // llama3, dynamic, longrope (0 = max_position_embeddings)
    // LongRoPE (Phi-3; "su" is its old name): per-frequency divisors [head_dim / 2], short up to
    // original_max_position_embeddings tokens, long past it; cos/sin scaled by attention_factor.
    std::vector<double> short_factor;
    std::vector<double> long_factor;
    double              attention_factor = 1.0;
};

struct model_config {
    std::string      path;          // the config.json read
    std::string      architecture;  // "LlamaForCausalLM"
    std::string      model_type;    // "llama"
    model_family     family = model_family::MODEL_FAMILY_LLAMA;
    const arch_desc* arch   = nullptr;  // the family's row of io/arch.h (never null once parsed)

    int64_t        vocab_size              = 0;
    int64_t        hidden_size             = 0;
    int64_t        intermediate_size       = 0;
    int64_t        num_hidden_layers       = 0;
    int64_t        num_attention_heads     = 0;
    int64_t        num_key_value_heads     = 0;  // GQA; defaults to num_attention_heads
    int64_t        head_dim                = 0;  // defaults to hidden_size / num_attention_heads
    int64_t        max_position_embeddings = 0;
    double         rms_norm_eps            = 1e-6;
    std::string    hidden_act              = "silu";  // the family's act_key ("hidden_activation" for Gemma)
    mlp_activation act                     = mlp_activation::ACT_SILU;
    rope_config    rope;

    bool    tie_word_embeddings = false;
    bool    attention_bias      = false;  // q/k/v/o bias (Llama); Qwen2: q/k/v always biased, o never
    bool    mlp_bias            = false;
    int64_t pretraining_tp      = 1;

    // Sliding window attention (Mistral; Qwen2 when use_sliding_window, from max_window_layers on).
    std::optional<int64_t>   sliding_window;
    bool                     use_sliding_window = false;
    int64_t                  max_window_layers  = 0;
    std::vector<std::string> layer_types;  // "sliding_attention" / "full_attention" per layer, or empty
    // (families with WINDOW_LAYER_TYPES get it from the family's pattern when config.json has none)

    // Gemma options (io/arch.h says which family reads which key); 0 = none / off.
    double query_pre_attn_scalar   = 0;  // attention scale query_pre_attn_scalar^-0.5
    double attn_logit_softcapping  = 0;  // attention scores -> cap * tanh(scores / cap)
    double final_logit_softcapping = 0;  // logits -> cap * tanh(logits / cap)
    // RoPE of the sliding-window layers when the family gives them their own (Gemma 3; `rope` is
    // then the full-attention layers' RoPE).
    bool        rope_local_differs = false;
    rope_config rope_local;

    // Mixture of experts (arch->moe.block set): num_local_experts / num_experts, num_experts_per_tok,
    // the experts' intermediate size (moe_intermediate_size; Mixtral: intermediate_size), the shared
    // expert's (Qwen2-MoE), norm_topk_prob, and which layers are sparse: (i + 1) %
    // decoder_sparse_step == 0 and i not in mlp_only_layers (Qwen; Mixtral: every layer). The
    // router's aux-loss keys are training-only and ignored.
    int64_t              num_experts                     = 0;
    int64_t              num_experts_per_tok             = 0;
    int64_t              moe_intermediate_size           = 0;
    int64_t              shared_expert_intermediate_size = 0;
    bool                 norm_topk_prob                  = false;
    int64_t              decoder_sparse_step             = 1;
    std::vector<int64_t> mlp_only_layers;
    bool                 layer_is_moe(int64_t i_layer) const;

    std::optional<int64_t> bos_token_id;
    std::vector<int64_t>   eos_token_ids;  // int or list in the file
    std::optional<int64_t> pad_token_id;
    std::string            dtype_name;  // "float16", "bfloat16", "float32" or "" when absent

    bool has_quantization_config = false;  // config.json carries quantization_config
    json quantization_config;              // raw object; see gptq_config.h

    // Whether layer i uses sliding-window attention (and so the window applies).
    bool layer_uses_sliding_window(int64_t i_layer) const;
    // Whether q/k/v (resp. o) projections carry a bias.
    bool qkv_bias() const { return arch->qkv_bias_always || attention_bias || qkv_bias_key_value; }
    bool o_bias() const { return !arch->qkv_bias_always && !arch->qkv_bias_key && attention_bias; }
    bool qkv_bias_key_value = false;  // arch->qkv_bias_key's value (Qwen2-MoE "qkv_bias", default true)
};

// Parse config.json at `path` (a file, or a folder holding config.json).
result<model_config> model_config_load(const std::string& path);
result<model_config> model_config_parse(const json& j, const std::string& path_for_errors);

// Absent keys: transformers 5's GenerationConfig defaults (_get_default_generation_params).
struct generation_config {
    bool                   found = false;  // the file exists (else every field is a default)
    std::optional<int64_t> bos_token_id;
    std::vector<int64_t>   eos_token_ids;
    std::optional<int64_t> pad_token_id;
    bool                   do_sample          = false;
    double                 temperature        = 1.0;
    double                 top_p              = 1.0;
    int64_t                top_k              = 50;
    double                 min_p              = 0.0;  // transformers: None (off)
    double                 repetition_penalty = 1.0;
    std::optional<int64_t> max_length;
    std::optional<int64_t> max_new_tokens;
};

// Parse generation_config.json (a file, or a folder holding it). A folder without one gives the
// defaults above (HF does the same); a file that exists but is malformed is an error.
result<generation_config> generation_config_load(const std::string& path);

}  // namespace gptq
