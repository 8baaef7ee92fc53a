#include "io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "core/error.h"
#include "core/log.h"
#include "io/tensor_source.h"

namespace gptq {

namespace {

constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;
constexpr auto E_UNSUP = status_code::STATUS_UNSUPPORTED;

// Read the token id fields that may be an int or a list of ints.
result<std::vector<int64_t>> read_id_list(const json& j, const char* key, const std::string& where) {
    std::vector<int64_t> out;
    auto                 it = j.find(key);
    if (it == j.end() || it->is_null()) return out;
    if (it->is_number_integer()) {
        out.push_back(it->get<int64_t>());
        return out;
    }
    if (it->is_array()) {
        for (const auto& v : *it) {
            if (!v.is_number_integer())
                return make_error(E_PARSE, "{}: key '{}' is {}, expected an integer or a list of integers", where, key,
                                  json_fields::quote(*it));
            out.push_back(v.get<int64_t>());
        }
        return out;
    }
    return make_error(E_PARSE, "{}: key '{}' is {}, expected an integer or a list of integers", where, key,
                      json_fields::quote(*it));
}

result<std::optional<int64_t>> read_opt_int(const json_fields& f, const char* key) {
    if (!f.has(key)) return std::optional<int64_t>();
    GPTQ_ASSIGN_OR_RETURN(int64_t v, f.get_int(key));
    return std::optional<int64_t>(v);
}

// LongRoPE (transformers' _compute_longrope_parameters): short_factor / long_factor lists,
// original_max_position_embeddings in the rope object or at the top level, attention_factor given
// or sqrt(1 + ln(factor) / ln(original)) with factor = max_position_embeddings / original when absent.
result<std::vector<double>> read_number_list(const json& p, const char* key, const std::string& where) {
    auto it = p.find(key);
    if (it == p.end() || !it->is_array() || it->empty())
        return make_error(E_PARSE, "{}: '{}' is {}, expected a list of numbers", where, key,
                          it == p.end() ? std::string("missing") : json_fields::quote(*it));
    std::vector<double> out;
    for (const auto& v : *it) {
        if (!v.is_number() || !(v.get<double>() > 0))
            return make_error(E_PARSE, "{}: '{}' holds {}, expected positive numbers", where, key,
                              json_fields::quote(v));
        out.push_back(v.get<double>());
    }
    return out;
}

status read_longrope(const json& j, const json_fields& p, const std::string& pwhere, model_config* cfg) {
    json_fields top{j, cfg->path};
    GPTQ_ASSIGN_OR_RETURN(cfg->rope.short_factor, read_number_list(p.obj, "short_factor", pwhere));
    GPTQ_ASSIGN_OR_RETURN(cfg->rope.long_factor, read_number_list(p.obj, "long_factor", pwhere));
    if (p.has("original_max_position_embeddings")) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.original_max_position_embeddings,
                              p.get_int("original_max_position_embeddings"));
    } else {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.original_max_position_embeddings,
                              top.get_int("original_max_position_embeddings"));
    }
    for (const auto* v : {&cfg->rope.short_factor, &cfg->rope.long_factor})
        if (static_cast<int64_t>(v->size()) != cfg->head_dim / 2)
            return make_error(E_PARSE, "{}: '{}' has {} values, expected head_dim / 2 = {}", pwhere,
                              v == &cfg->rope.short_factor ? "short_factor" : "long_factor", v->size(),
                              cfg->head_dim / 2);
    const int64_t orig = cfg->rope.original_max_position_embeddings;
    if (orig <= 1) return make_error(E_PARSE, "{}: original_max_position_embeddings {} must be > 1", pwhere, orig);
    GPTQ_ASSIGN_OR_RETURN(int64_t max_pos, top.get_int_or("max_position_embeddings", cfg->arch->default_max_positions));
    double factor = static_cast<double>(max_pos) / static_cast<double>(orig);
    if (p.has("factor")) {
        GPTQ_ASSIGN_OR_RETURN(factor, p.get_number("factor"));
    }
    cfg->rope.factor = factor;
    if (p.has("attention_factor")) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.attention_factor, p.get_number("attention_factor"));
    } else {
        cfg->rope.attention_factor =
            factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(static_cast<double>(orig)));
    }
    if (!(cfg->rope.attention_factor > 0))
        return make_error(E_PARSE, "{}: attention_factor {} must be > 0", pwhere, cfg->rope.attention_factor);
    if (!(cfg->rope.theta > 0.0)) return make_error(E_PARSE, "{}: rope_theta {} must be > 0", pwhere, cfg->rope.theta);
    return status::ok();
}

// RoPE: transformers 5 "rope_parameters" {rope_theta, rope_type, ...} or transformers 4 top-level
// "rope_theta" + "rope_scaling" {type|rope_type, factor, ...}.
status read_rope(const json& j, const std::string& where, model_config* cfg) {
    json_fields top{j, where};
    const json* params = nullptr;
    std::string params_key;
    if (top.has("rope_parameters")) {
        params     = &j.at("rope_parameters");
        params_key = "rope_parameters";
    } else if (top.has("rope_scaling")) {
        params     = &j.at("rope_scaling");
        params_key = "rope_scaling";
    }
    GPTQ_ASSIGN_OR_RETURN(cfg->rope.theta, top.get_number_or("rope_theta", cfg->arch->default_rope_theta));
    if (!params) return status::ok();
    if (!params->is_object())
        return make_error(E_PARSE, "{}: '{}' is {}, expected an object", where, params_key,
                          json_fields::quote(*params));
    const std::string pwhere = where + " " + params_key;
    json_fields       p{*params, pwhere};
    if (p.has("rope_theta")) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.theta, p.get_number("rope_theta"));
    }
    std::string type = "default";
    if (p.has("rope_type")) {
        GPTQ_ASSIGN_OR_RETURN(type, p.get_string("rope_type"));
    } else if (p.has("type")) {
        GPTQ_ASSIGN_OR_RETURN(type, p.get_string("type"));
    }
    if (type == "default") {
        cfg->rope.type = rope_type::ROPE_DEFAULT;
    } else if (type == "linear") {
        cfg->rope.type = rope_type::ROPE_LINEAR;
    } else if (type == "dynamic") {
        cfg->rope.type = rope_type::ROPE_DYNAMIC;
    } else if (type == "llama3") {
        cfg->rope.type = rope_type::ROPE_LLAMA3;
    } else if ((type == "longrope" || type == "su") && cfg->arch->rope_longrope) {
        cfg->rope.type = rope_type::ROPE_LONGROPE;
        return read_longrope(j, p, pwhere, cfg);
    } else {
        return make_error(E_UNSUP,
                          "{}: unsupported rope type '{}' for {} (supported: default, linear, dynamic, llama3{})",
                          pwhere, type, cfg->architecture, cfg->arch->rope_longrope ? ", longrope, su" : "");
    }
    if (cfg->rope.type != rope_type::ROPE_DEFAULT) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.factor, p.get_number("factor"));
        if (!(cfg->rope.factor >= 1.0) && cfg->rope.type != rope_type::ROPE_LINEAR)
            return make_error(E_PARSE, "{}: factor {} must be >= 1", pwhere, cfg->rope.factor);
        if (!(cfg->rope.factor > 0.0))
            return make_error(E_PARSE, "{}: factor {} must be > 0", pwhere, cfg->rope.factor);
    }
    if (cfg->rope.type == rope_type::ROPE_LLAMA3) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.low_freq_factor, p.get_number("low_freq_factor"));
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.high_freq_factor, p.get_number("high_freq_factor"));
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.original_max_position_embeddings,
                              p.get_int("original_max_position_embeddings"));
        if (!(cfg->rope.high_freq_factor > cfg->rope.low_freq_factor))
            return make_error(E_PARSE, "{}: high_freq_factor {} must exceed low_freq_factor {}", pwhere,
                              cfg->rope.high_freq_factor, cfg->rope.low_freq_factor);
    } else if (cfg->rope.type == rope_type::ROPE_DYNAMIC) {
        GPTQ_ASSIGN_OR_RETURN(cfg->rope.original_max_position_embeddings,
                              p.get_int_or("original_max_position_embeddings", 0));
    }
    if (!(cfg->rope.theta > 0.0)) return make_error(E_PARSE, "{}: rope_theta {} must be > 0", where, cfg->rope.theta);
    return status::ok();
}

// RoPE per layer type (arch_desc.rope_by_layer_type, Gemma 3): cfg->rope for the full-attention
// layers, cfg->rope_local for the sliding ones. Each is read by read_rope from an object holding
// just that layer type's keys, so both dialects share its checks.
status read_rope_by_layer_type(const json& j, const std::string& where, model_config* cfg) {
    const arch_desc& a      = *cfg->arch;
    json             global = {{"rope_theta", a.default_rope_theta}};
    json             local  = {{"rope_theta", a.default_rope_local_theta}};
    std::string      gwhere = where, lwhere = where;
    const auto       rp = j.find("rope_parameters");
    if (rp != j.end() && !rp->is_null()) {
        // transformers 5: one object per layer type; a missing one is the default RoPE.
        if (!rp->is_object() || (!rp->contains("full_attention") && !rp->contains("sliding_attention")))
            return make_error(E_UNSUP,
                              "{}: 'rope_parameters' is {}; {} expects one object per layer type "
                              "(full_attention, sliding_attention)",
                              where, json_fields::quote(*rp), cfg->architecture);
        for (const auto& [key, target, twhere] :
             {std::tuple{"full_attention", &global, &gwhere}, std::tuple{"sliding_attention", &local, &lwhere}}) {
            auto it = rp->find(key);
            if (it == rp->end() || it->is_null()) continue;
            (*target)["rope_parameters"] = *it;
            *twhere                      = where + " rope_parameters." + key;
        }
    } else {
        // transformers 4: rope_theta and rope_scaling are the global layers'; the local layers
        // have the default RoPE with base rope_local_base_freq.
        json_fields top{j, where};
        GPTQ_ASSIGN_OR_RETURN(double theta, top.get_number_or("rope_theta", a.default_rope_theta));
        GPTQ_ASSIGN_OR_RETURN(double local_theta,
                              top.get_number_or("rope_local_base_freq", a.default_rope_local_theta));
        global["rope_theta"] = theta;
        if (top.has("rope_scaling")) global["rope_scaling"] = j.at("rope_scaling");
        local["rope_theta"] = local_theta;
        lwhere              = where + " rope_local_base_freq";
    }
    GPTQ_TRY(read_rope(global, gwhere, cfg));
    model_config l;  // read_rope fills l.rope; it reads the architecture's description only
    l.architecture = cfg->architecture;
    l.arch         = cfg->arch;
    GPTQ_TRY(read_rope(local, lwhere, &l));
    cfg->rope_local         = l.rope;
    cfg->rope_local_differs = true;
    return status::ok();
}

// A soft-capping key: absent -> the family's default, null -> off (0), else a positive number.
result<double> read_softcap(const json& j, const char* key, double def, const std::string& where) {
    const auto it = j.find(key);
    if (it == j.end()) return def;
    if (it->is_null()) return 0.0;
    if (!it->is_number() || !(it->get<double>() > 0))
        return make_error(E_PARSE, "{}: '{}' is {}, expected a positive number or null", where, key,
                          json_fields::quote(*it));
    return it->get<double>();
}

// The Gemma keys the family's description says it reads (io/arch.h).
status read_gemma_options(const json& j, const std::string& where, model_config* cfg) {
    const arch_desc& a = *cfg->arch;
    json_fields      f{j, where};
    if (a.default_query_pre_attn_scalar > 0) {
        GPTQ_ASSIGN_OR_RETURN(cfg->query_pre_attn_scalar,
                              f.get_number_or("query_pre_attn_scalar", a.default_query_pre_attn_scalar));
        if (!(cfg->query_pre_attn_scalar > 0))
            return make_error(E_PARSE, "{}: query_pre_attn_scalar is {}, expected a positive number", where,
                              cfg->query_pre_attn_scalar);
    }
    if (a.reads_attn_softcap) {
        GPTQ_ASSIGN_OR_RETURN(cfg->attn_logit_softcapping,
                              read_softcap(j, "attn_logit_softcapping", a.default_attn_softcap, where));
    }
    if (a.reads_final_softcap) {
        GPTQ_ASSIGN_OR_RETURN(cfg->final_logit_softcapping,
                              read_softcap(j, "final_logit_softcapping", a.default_final_softcap, where));
    }
    return status::ok();
}

// The MoE keys of a family with a sparse block (io/arch.h arch_moe_desc), both dialects: the
// expert count under the family's key or its other spelling (Qwen3-MoE: transformers 4
// num_experts, 5 num_local_experts).
status read_moe(const json& j, const std::string& where, model_config* cfg) {
    const arch_moe_desc& m = cfg->arch->moe;
    if (!m.block) return status::ok();
    json_fields f{j, where};
    const char* n_key =
        f.has(m.n_experts_key) || !m.n_experts_alt || !f.has(m.n_experts_alt) ? m.n_experts_key : m.n_experts_alt;
    GPTQ_ASSIGN_OR_RETURN(cfg->num_experts, f.get_int(n_key));
    GPTQ_ASSIGN_OR_RETURN(cfg->num_experts_per_tok, f.get_int("num_experts_per_tok"));
    GPTQ_ASSIGN_OR_RETURN(cfg->moe_intermediate_size, f.get_int(m.ff_key));
    constexpr int64_t k_max = int64_t(1) << 16;  // far above any real model (fuzz/fuzz_config)
    if (cfg->num_experts < 1 || cfg->num_experts > k_max)
        return make_error(E_PARSE, "{}: {} is {}, expected 1 .. {}", where, n_key, cfg->num_experts, k_max);
    if (cfg->num_experts_per_tok < 1 || cfg->num_experts_per_tok > cfg->num_experts)
        return make_error(E_PARSE, "{}: num_experts_per_tok is {}, expected 1 .. {} ({})", where,
                          cfg->num_experts_per_tok, cfg->num_experts, n_key);
    if (cfg->moe_intermediate_size < 1 || cfg->moe_intermediate_size > (int64_t(1) << 31))
        return make_error(E_PARSE, "{}: {} is {}, expected a positive integer", where, m.ff_key,
                          cfg->moe_intermediate_size);
    if (m.shared_expert) {
        GPTQ_ASSIGN_OR_RETURN(cfg->shared_expert_intermediate_size, f.get_int("shared_expert_intermediate_size"));
        if (cfg->shared_expert_intermediate_size < 0 || cfg->shared_expert_intermediate_size > (int64_t(1) << 31))
            return make_error(E_PARSE, "{}: shared_expert_intermediate_size is {}, expected >= 0", where,
                              cfg->shared_expert_intermediate_size);
        if (cfg->shared_expert_intermediate_size == 0)
            return make_error(E_UNSUP, "{}: shared_expert_intermediate_size 0 is not supported", where);
    }
    if (m.renorm_always) {
        cfg->norm_topk_prob = true;
    } else {
        GPTQ_ASSIGN_OR_RETURN(cfg->norm_topk_prob, f.get_bool_or("norm_topk_prob", false));
    }
    if (m.sparse_step) {
        GPTQ_ASSIGN_OR_RETURN(cfg->decoder_sparse_step, f.get_int_or("decoder_sparse_step", 1));
        if (cfg->decoder_sparse_step < 1)
            return make_error(E_PARSE, "{}: decoder_sparse_step is {}, expected a positive integer", where,
                              cfg->decoder_sparse_step);
        if (f.has("mlp_only_layers") && !j.at("mlp_only_layers").is_null()) {
            const json& l = j.at("mlp_only_layers");
            if (!l.is_array())
                return make_error(E_PARSE, "{}: 'mlp_only_layers' is {}, expected a list of layer indices", where,
                                  json_fields::quote(l));
            for (const auto& v : l) {
                if (!v.is_number_integer())
                    return make_error(E_PARSE, "{}: 'mlp_only_layers' holds {}, expected layer indices", where,
                                      json_fields::quote(v));
                cfg->mlp_only_layers.push_back(v.get<int64_t>());
            }
        }
    }
    return status::ok();
}

// WINDOW_LAYER_TYPES without "layer_types": transformers' default list, layer i full attention
// when (i + 1) % pattern == 0. Gemma 3 reads the pattern from "sliding_window_pattern" (transformers
// 4.50) or "_sliding_window_pattern" (as later versions save it).
status default_layer_types(const json& j, const std::string& where, model_config* cfg) {
    const arch_desc& a       = *cfg->arch;
    int64_t          pattern = a.default_window_pattern;
    json_fields      f{j, where};
    if (a.window_pattern_key) {
        const std::string hidden = std::string("_") + a.window_pattern_key;
        if (f.has(a.window_pattern_key)) {
            GPTQ_ASSIGN_OR_RETURN(pattern, f.get_int(a.window_pattern_key));
        } else if (f.has(hidden.c_str())) {
            GPTQ_ASSIGN_OR_RETURN(pattern, f.get_int(hidden.c_str()));
        }
    }
    if (pattern < 1)
        return make_error(E_PARSE, "{}: {} is {}, expected a positive integer", where,
                          a.window_pattern_key ? a.window_pattern_key : "sliding window pattern", pattern);
    // The list is built here, not read: bound it as model/ bounds the layer count (k_llama_max_dim),
    // so that a hostile num_hidden_layers cannot make it huge (fuzz/fuzz_config).
    constexpr int64_t k_max_layers = int64_t(1) << 16;
    if (cfg->num_hidden_layers > k_max_layers)
        return make_error(E_UNSUP, "{}: num_hidden_layers is {}, more than the {} supported", where,
                          cfg->num_hidden_layers, k_max_layers);
    for (int64_t i = 0; i < cfg->num_hidden_layers; ++i)
        cfg->layer_types.push_back((i + 1) % pattern != 0 ? "sliding_attention" : "full_attention");
    return status::ok();
}

}  // namespace

const char* rope_type_name(rope_type t) {
    switch (t) {
        case rope_type::ROPE_DEFAULT:
            return "default";
        case rope_type::ROPE_LINEAR:
            return "linear";
        case rope_type::ROPE_DYNAMIC:
            return "dynamic";
        case rope_type::ROPE_LLAMA3:
            return "llama3";
        case rope_type::ROPE_LONGROPE:
            return "longrope";
    }
    return "?";
}

bool model_config::layer_is_moe(int64_t i_layer) const {
    if (!arch || !arch->moe.block || num_experts <= 0) return false;
    if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), i_layer) != mlp_only_layers.end()) return false;
    return (i_layer + 1) % decoder_sparse_step == 0;
}

bool model_config::layer_uses_sliding_window(int64_t i_layer) const {
    if (!sliding_window) return false;
    switch (arch->window) {
        case arch_window_rule::WINDOW_ALL:
            return true;
        case arch_window_rule::WINDOW_FROM_MAX_LAYER:
            // transformers 5 (Qwen2Config / Qwen3Config): the window exists only with
            // use_sliding_window; "layer_types", when saved, says which layers use it, else the
            // layers from max_window_layers on.
            if (!use_sliding_window) return false;
            if (!layer_types.empty())
                return i_layer < static_cast<int64_t>(layer_types.size()) &&
                       layer_types[static_cast<size_t>(i_layer)] == "sliding_attention";
            return i_layer >= max_window_layers;
        case arch_window_rule::WINDOW_LAYER_TYPES:
            return i_layer < static_cast<int64_t>(layer_types.size()) &&
                   layer_types[static_cast<size_t>(i_layer)] == "sliding_attention";
        case arch_window_rule::WINDOW_NONE:
            return false;
    }
    return false;
}

result<model_config> model_config_parse(const json& j, const std::string& where) {
    if (!j.is_object()) return make_error(E_PARSE, "{}: expected a JSON object", where);
    json_fields  f{j, where};
    model_config cfg;
    cfg.path = where;

    // Architecture: "architectures"[0], else model_type.
    const arch_desc* fam = nullptr;
    if (f.has("architectures")) {
        const auto& a = j.at("architectures");
        if (!a.is_array() || a.empty() || !a[0].is_string())
            return make_error(E_PARSE, "{}: 'architectures' is {}, expected a list of names", where,
                              json_fields::quote(a));
        cfg.architecture = a[0].get<std::string>();
        fam              = arch_find_architecture(cfg.architecture);
        if (!fam)
            return make_error(E_UNSUP, "{}: unsupported architecture '{}' (supported: {})", where, cfg.architecture,
                              arch_supported_list());
    }
    GPTQ_ASSIGN_OR_RETURN(cfg.model_type, f.get_string_or("model_type", fam ? fam->model_type : ""));
    if (!fam) {
        fam = arch_find_model_type(cfg.model_type);
        if (!fam)
            return make_error(E_UNSUP, "{}: unsupported model_type '{}' and no 'architectures' (supported: {})", where,
                              cfg.model_type, arch_supported_list());
        cfg.architecture = fam->architecture;
    }
    cfg.family = fam->family;
    cfg.arch   = fam;

    GPTQ_ASSIGN_OR_RETURN(cfg.hidden_size, f.get_int("hidden_size"));
    GPTQ_ASSIGN_OR_RETURN(cfg.num_hidden_layers, f.get_int("num_hidden_layers"));
    GPTQ_ASSIGN_OR_RETURN(cfg.num_attention_heads, f.get_int("num_attention_heads"));
    GPTQ_ASSIGN_OR_RETURN(cfg.intermediate_size, f.get_int("intermediate_size"));
    GPTQ_ASSIGN_OR_RETURN(cfg.vocab_size, f.get_int("vocab_size"));
    GPTQ_ASSIGN_OR_RETURN(cfg.num_key_value_heads, f.get_int_or("num_key_value_heads", cfg.num_attention_heads));
    struct {
        const char* key;
        int64_t     v;
    } positives[] = {{"hidden_size", cfg.hidden_size},
                     {"num_hidden_layers", cfg.num_hidden_layers},
                     {"num_attention_heads", cfg.num_attention_heads},
                     {"intermediate_size", cfg.intermediate_size},
                     {"vocab_size", cfg.vocab_size},
                     {"num_key_value_heads", cfg.num_key_value_heads}};
    for (const auto& p : positives)
        if (p.v <= 0 || p.v > (int64_t(1) << 31))
            return make_error(E_PARSE, "{}: {} is {}, expected a positive integer", where, p.key, p.v);
    if (cfg.num_attention_heads % cfg.num_key_value_heads != 0)
        return make_error(E_PARSE, "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", where,
                          cfg.num_attention_heads, cfg.num_key_value_heads);
    if (f.has("head_dim")) {
        GPTQ_ASSIGN_OR_RETURN(cfg.head_dim, f.get_int("head_dim"));
        if (cfg.head_dim <= 0 || cfg.head_dim % 2 != 0)
            return make_error(E_PARSE, "{}: head_dim is {}, expected a positive even integer", where, cfg.head_dim);
    } else if (fam->default_head_dim > 0) {
        cfg.head_dim = fam->default_head_dim;
    } else {
        if (cfg.hidden_size % cfg.num_attention_heads != 0)
            return make_error(E_PARSE,
                              "{}: hidden_size {} is not divisible by num_attention_heads {} (and no head_dim)", where,
                              cfg.hidden_size, cfg.num_attention_heads);
        cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads;
    }
    GPTQ_ASSIGN_OR_RETURN(cfg.max_position_embeddings,
                          f.get_int_or("max_position_embeddings", fam->default_max_positions));
    GPTQ_ASSIGN_OR_RETURN(cfg.rms_norm_eps, f.get_number_or("rms_norm_eps", 1e-6));
    if (!(cfg.rms_norm_eps > 0.0))
        return make_error(E_PARSE, "{}: rms_norm_eps {} must be > 0", where, cfg.rms_norm_eps);
    GPTQ_ASSIGN_OR_RETURN(cfg.hidden_act, f.get_string_or(fam->act_key, fam->act_default));
    if (cfg.hidden_act == "silu") {
        cfg.act = mlp_activation::ACT_SILU;
    } else if (cfg.hidden_act == "gelu_pytorch_tanh") {
        cfg.act = mlp_activation::ACT_GELU_TANH;
    } else {
        return make_error(E_UNSUP, "{}: unsupported {} '{}' (supported: silu, gelu_pytorch_tanh)", where, fam->act_key,
                          cfg.hidden_act);
    }
    if (fam->rope_by_layer_type) {
        GPTQ_TRY(read_rope_by_layer_type(j, where, &cfg));
    } else {
        GPTQ_TRY(read_rope(j, where, &cfg));
    }
    GPTQ_TRY(read_gemma_options(j, where, &cfg));
    {
        double partial = 1.0;
        GPTQ_ASSIGN_OR_RETURN(partial, f.get_number_or("partial_rotary_factor", 1.0));
        for (const char* k : {"rope_parameters", "rope_scaling"})
            if (f.has(k) && j.at(k).is_object() && j.at(k).contains("partial_rotary_factor")) {
                json_fields rp{j.at(k), where};
                GPTQ_ASSIGN_OR_RETURN(partial, rp.get_number("partial_rotary_factor"));
            }
        if (partial != 1.0)
            return make_error(E_UNSUP, "{}: partial_rotary_factor {} is not supported (only 1.0)", where, partial);
    }

    GPTQ_ASSIGN_OR_RETURN(cfg.tie_word_embeddings, f.get_bool_or("tie_word_embeddings", fam->tie_default));
    GPTQ_ASSIGN_OR_RETURN(cfg.attention_bias, f.get_bool_or("attention_bias", false));
    GPTQ_ASSIGN_OR_RETURN(cfg.mlp_bias, f.get_bool_or("mlp_bias", false));
    if (fam->qkv_bias_key) {
        GPTQ_ASSIGN_OR_RETURN(cfg.qkv_bias_key_value, f.get_bool_or(fam->qkv_bias_key, true));
    }
    GPTQ_TRY(read_moe(j, where, &cfg));
    if (cfg.mlp_bias) return make_error(E_UNSUP, "{}: mlp_bias true is not supported", where);
    GPTQ_ASSIGN_OR_RETURN(cfg.pretraining_tp, f.get_int_or("pretraining_tp", 1));

    GPTQ_ASSIGN_OR_RETURN(cfg.sliding_window, read_opt_int(f, "sliding_window"));
    if (f.has("layer_types")) {
        const json& lt = j.at("layer_types");
        if (!lt.is_array() || static_cast<int64_t>(lt.size()) != cfg.num_hidden_layers)
            return make_error(E_PARSE, "{}: 'layer_types' is {}, expected a list of {} names", where,
                              json_fields::quote(lt), cfg.num_hidden_layers);
        for (const auto& v : lt) {
            if (!v.is_string() || (v != "sliding_attention" && v != "full_attention"))
                return make_error(E_UNSUP, "{}: 'layer_types' holds {} (supported: sliding_attention, full_attention)",
                                  where, json_fields::quote(v));
            cfg.layer_types.push_back(v.get<std::string>());
        }
    }
    if (cfg.layer_types.empty() && fam->window == arch_window_rule::WINDOW_LAYER_TYPES)
        GPTQ_TRY(default_layer_types(j, where, &cfg));
    if (fam->window == arch_window_rule::WINDOW_LAYER_TYPES && !cfg.sliding_window)
        for (const auto& t : cfg.layer_types)
            if (t == "sliding_attention")
                return make_error(E_UNSUP, "{}: layer_types has sliding_attention layers but sliding_window is null",
                                  where);
    GPTQ_ASSIGN_OR_RETURN(cfg.use_sliding_window, f.get_bool_or("use_sliding_window", false));
    GPTQ_ASSIGN_OR_RETURN(cfg.max_window_layers, f.get_int_or("max_window_layers", 0));
    // Qwen2-MoE (transformers 5) saves sliding_window 0 when use_sliding_window is false: no window.
    if (fam->moe.block && cfg.sliding_window && *cfg.sliding_window == 0 && !cfg.use_sliding_window)
        cfg.sliding_window.reset();
    if (cfg.sliding_window && *cfg.sliding_window <= 0)
        return make_error(E_PARSE, "{}: sliding_window is {}, expected a positive integer or null", where,
                          *cfg.sliding_window);

    GPTQ_ASSIGN_OR_RETURN(cfg.bos_token_id, read_opt_int(f, "bos_token_id"));
    GPTQ_ASSIGN_OR_RETURN(cfg.eos_token_ids, read_id_list(j, "eos_token_id", where));
    GPTQ_ASSIGN_OR_RETURN(cfg.pad_token_id, read_opt_int(f, "pad_token_id"));
    if (f.has("dtype")) {
        GPTQ_ASSIGN_OR_RETURN(cfg.dtype_name, f.get_string("dtype"));
    } else {
        GPTQ_ASSIGN_OR_RETURN(cfg.dtype_name, f.get_string_or("torch_dtype", ""));
    }
    if (f.has("quantization_config")) {
        cfg.has_quantization_config = true;
        cfg.quantization_config     = j.at("quantization_config");
    }
    return cfg;
}

result<model_config> model_config_load(const std::string& path) {
    if (dir_exists(path)) GPTQ_TRY(work_folder_check(path));
    const std::string file = dir_exists(path) ? path_join(path, "config.json") : path;
    GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(file));
    return model_config_parse(j, file);
}

result<generation_config> generation_config_load(const std::string& path) {
    generation_config g;
    std::string       file = path;
    if (dir_exists(path)) {
        file = path_join(path, "generation_config.json");
        if (!file_exists(file)) return g;
    }
    GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(file));
    if (!j.is_object()) return make_error(E_PARSE, "{}: expected a JSON object", file);
    json_fields f{j, file};
    GPTQ_ASSIGN_OR_RETURN(g.bos_token_id, read_opt_int(f, "bos_token_id"));
    GPTQ_ASSIGN_OR_RETURN(g.eos_token_ids, read_id_list(j, "eos_token_id", file));
    GPTQ_ASSIGN_OR_RETURN(g.pad_token_id, read_opt_int(f, "pad_token_id"));
    GPTQ_ASSIGN_OR_RETURN(g.do_sample, f.get_bool_or("do_sample", false));
    GPTQ_ASSIGN_OR_RETURN(g.temperature, f.get_number_or("temperature", 1.0));
    GPTQ_ASSIGN_OR_RETURN(g.top_p, f.get_number_or("top_p", 1.0));
    GPTQ_ASSIGN_OR_RETURN(g.top_k, f.get_int_or("top_k", 50));
    GPTQ_ASSIGN_OR_RETURN(g.min_p, f.get_number_or("min_p", 0.0));
    GPTQ_ASSIGN_OR_RETURN(g.repetition_penalty, f.get_number_or("repetition_penalty", 1.0));
    GPTQ_ASSIGN_OR_RETURN(g.max_length, read_opt_int(f, "max_length"));
    GPTQ_ASSIGN_OR_RETURN(g.max_new_tokens, read_opt_int(f, "max_new_tokens"));
    g.found = true;
    if (g.temperature < 0) return make_error(E_PARSE, "{}: temperature {} must be >= 0", file, g.temperature);
    if (!(g.top_p > 0 && g.top_p <= 1)) return make_error(E_PARSE, "{}: top_p {} must be in (0, 1]", file, g.top_p);
    if (g.top_k < 0) return make_error(E_PARSE, "{}: top_k {} must be >= 0", file, g.top_k);
    if (!(g.min_p >= 0 && g.min_p <= 1)) return make_error(E_PARSE, "{}: min_p {} must be in [0, 1]", file, g.min_p);
    if (!(g.repetition_penalty > 0))
        return make_error(E_PARSE, "{}: repetition_penalty {} must be > 0", file, g.repetition_penalty);
    for (const auto& [key, v] : {std::pair{"max_length", g.max_length}, std::pair{"max_new_tokens", g.max_new_tokens}})
        if (v && *v <= 0) return make_error(E_PARSE, "{}: {} {} must be > 0", file, key, *v);
    return g;
}

}  // namespace gptq
