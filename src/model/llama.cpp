// The decoder families of io/arch.h: see llama.h. The forward pass mirrors transformers'
// modeling_llama and the families' modeling_<family>.py, whose differences are options here.
#include "model/llama.h"

#include "core/thread_pool.h"

#include "io/gptq_checkpoint.h"
#include "io/gptq_zero_format.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <string_view>

#include <fmt/ranges.h>

#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"

namespace gptq {

namespace {
constexpr status_code E_UNSUP = status_code::STATUS_UNSUPPORTED;
constexpr status_code E_ARG   = status_code::STATUS_INVALID_ARGUMENT;

const char* const k_role_names[k_n_linear_roles] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
bool              role_is_attention(linear_role r) {
                 return static_cast<int>(r) <= static_cast<int>(linear_role::LINEAR_O);
}
bool role_has_bias(const llama_hparams& hp, linear_role r) {
    switch (r) {
        case linear_role::LINEAR_Q:
        case linear_role::LINEAR_K:
        case linear_role::LINEAR_V:
            return hp.qkv_bias;
        case linear_role::LINEAR_O:
            return hp.o_bias;
        default:
            return hp.mlp_bias;
    }
}
}  // namespace

const char* linear_role_name(linear_role r) {
    return k_role_names[static_cast<size_t>(r)];
}

linear_input linear_role_input(linear_role r) {
    switch (r) {
        case linear_role::LINEAR_Q:
        case linear_role::LINEAR_K:
        case linear_role::LINEAR_V:
            return linear_input::LINEAR_INPUT_QKV;
        case linear_role::LINEAR_O:
            return linear_input::LINEAR_INPUT_O;
        case linear_role::LINEAR_GATE:
        case linear_role::LINEAR_UP:
            return linear_input::LINEAR_INPUT_GATE_UP;
        default:
            return linear_input::LINEAR_INPUT_DOWN;
    }
}

const char* linear_input_name(linear_input i) {
    switch (i) {
        case linear_input::LINEAR_INPUT_QKV:
            return "qkv";
        case linear_input::LINEAR_INPUT_O:
            return "o";
        case linear_input::LINEAR_INPUT_GATE_UP:
            return "gate_up";
        default:
            return "down";
    }
}

std::array<int64_t, 2> llama_hparams::linear_shape(linear_role r) const {
    switch (r) {
        case linear_role::LINEAR_Q:
            return {q_dim(), n_embd};
        case linear_role::LINEAR_K:
        case linear_role::LINEAR_V:
            return {kv_dim(), n_embd};
        case linear_role::LINEAR_O:
            return {n_embd, q_dim()};
        case linear_role::LINEAR_GATE:
        case linear_role::LINEAR_UP:
            return {n_ff, n_embd};
        default:
            return {n_embd, n_ff};
    }
}

namespace {
// The family's description and config values as options of the one layer (llama.h).
status hparams_set_options(const model_config& cfg, llama_hparams* hp) {
    const arch_desc& a = *cfg.arch;
    hp->qk_norm        = a.qk_norm;
    hp->norm_plus_one  = a.norm_plus_one;
    hp->attn_out_norm  = a.norms.attn_out != nullptr;
    hp->mlp_out_norm   = a.norms.mlp_out != nullptr;
    hp->act            = cfg.act;
    // torch.tensor(hidden_size ** 0.5): the double square root rounded to F32.
    hp->embed_scale = a.embed_scale ? static_cast<float>(std::sqrt(static_cast<double>(hp->n_embd))) : 1.0f;
    hp->attn_scale  = 1.0f / std::sqrt(static_cast<float>(hp->head_dim));
    // Gemma: query_pre_attn_scalar ** -0.5 in Python (double), applied to F32 scores as an F32 scalar.
    if (cfg.query_pre_attn_scalar > 0) hp->attn_scale = static_cast<float>(std::pow(cfg.query_pre_attn_scalar, -0.5));
    hp->attn_softcap       = static_cast<float>(cfg.attn_logit_softcapping);
    hp->final_softcap      = static_cast<float>(cfg.final_logit_softcapping);
    hp->rope_local_differs = cfg.rope_local_differs;
    hp->rope_local         = cfg.rope_local;
    hp->fused_qkv          = a.fused_qkv;
    hp->fused_gate_up      = a.fused_gate_up;
    if (hp->rope.type == rope_type::ROPE_LONGROPE) {
        const size_t half = static_cast<size_t>(hp->head_dim / 2);
        if (hp->rope.short_factor.size() != half || hp->rope.long_factor.size() != half)
            return make_error(E_ARG,
                              "{}: longrope short_factor/long_factor have {}/{} values, expected head_dim / 2 = {}",
                              cfg.path, hp->rope.short_factor.size(), hp->rope.long_factor.size(), half);
    }
    return status::ok();
}
}  // namespace

namespace {
// The options of hp in use beyond the Llama layer ("qk_norm, fused_qkv, ..."); gpu_only: those the
// one GPU decoder layer does not run yet (each option's `gpu` says whether it runs there).
std::string options_in_use(const llama_hparams& hp, bool gpu_only) {
    std::string out;
    auto        add = [&](bool on, const char* name, bool gpu) {
        if (on && !(gpu_only && gpu)) out += (out.empty() ? "" : ", ") + std::string(name);
    };
    const float default_scale = hp.head_dim > 0 ? 1.0f / std::sqrt(static_cast<float>(hp.head_dim)) : 0.0f;
    add(hp.qk_norm, "qk_norm", true);
    add(hp.norm_plus_one, "norm_plus_one", true);
    add(hp.attn_out_norm || hp.mlp_out_norm, "sandwich_norms", true);
    add(hp.act != mlp_activation::ACT_SILU, mlp_activation_name(hp.act), hp.act == mlp_activation::ACT_GELU_TANH);
    add(hp.embed_scale != 1.0f, "embed_scale", true);
    add(hp.head_dim > 0 && hp.attn_scale != default_scale, "attn_scale", true);
    add(hp.attn_softcap > 0.0f, "attn_softcap", true);
    add(hp.final_softcap > 0.0f, "final_softcap", true);
    add(hp.rope_local_differs, "rope_local", true);
    add(hp.rope.type == rope_type::ROPE_LONGROPE, "longrope", true);
    add(hp.fused_qkv, "fused_qkv", true);
    add(hp.fused_gate_up, "fused_gate_up", true);
    add(hp.n_expert > 0, "moe", true);  // the sparse block of the GPU layer (llama_cuda_moe.h)
    return out;
}
}  // namespace

std::string llama_hparams::options_beyond_llama() const {
    return options_in_use(*this, false);
}

std::string llama_hparams::options_beyond_gpu() const {
    return options_in_use(*this, true);
}

status llama_gpu_options_check(const llama_hparams& hp, const std::string& who) {
    if (const std::string opts = hp.options_beyond_gpu(); !opts.empty())
        return make_error(E_UNSUP, "{}: {} uses {}, which the GPU does not run yet; use --device cpu", who,
                          model_family_name(hp.family), opts);
    return status::ok();
}

const rope_config& llama_hparams::rope_of(int64_t i_layer) const {
    return rope_local_differs && window[static_cast<size_t>(i_layer)] > 0 ? rope_local : rope;
}

result<llama_hparams> llama_hparams_from_config(const model_config& cfg) {
    const std::string& where = cfg.path;
    if (!cfg.arch) return make_error(E_ARG, "{}: config has no architecture description", where);
    llama_hparams hp;
    hp.family                                        = cfg.family;
    hp.arch                                          = cfg.arch;
    hp.n_vocab                                       = cfg.vocab_size;
    hp.n_embd                                        = cfg.hidden_size;
    hp.n_ff                                          = cfg.intermediate_size;
    hp.n_layer                                       = cfg.num_hidden_layers;
    hp.n_head                                        = cfg.num_attention_heads;
    hp.n_head_kv                                     = cfg.num_key_value_heads;
    hp.head_dim                                      = cfg.head_dim;
    hp.rms_eps                                       = static_cast<float>(cfg.rms_norm_eps);
    hp.max_position_embeddings                       = cfg.max_position_embeddings;
    hp.rope                                          = cfg.rope;
    hp.tie_embeddings                                = cfg.tie_word_embeddings;
    hp.qkv_bias                                      = cfg.qkv_bias();
    hp.o_bias                                        = cfg.o_bias();
    hp.mlp_bias                                      = cfg.mlp_bias;
    const std::pair<const char*, int64_t> positive[] = {
        {"vocab_size", hp.n_vocab},        {"hidden_size", hp.n_embd},         {"intermediate_size", hp.n_ff},
        {"num_hidden_layers", hp.n_layer}, {"num_attention_heads", hp.n_head}, {"num_key_value_heads", hp.n_head_kv},
        {"head_dim", hp.head_dim}};
    for (const auto& [name, v] : positive)
        if (v <= 0) return make_error(E_ARG, "{}: {} is {}, expected a positive integer", where, name, v);
    // Bounds far above any real model, so that every size derived below (q_dim, kv_dim, tensor
    // shapes, the per-layer tables) fits in int64 and nothing huge is allocated before the
    // checkpoint's tensors are checked (found by fuzz/fuzz_config; docs/reliability.md).
    const std::pair<const char*, int64_t> bounded[] = {{"num_hidden_layers", hp.n_layer},
                                                       {"num_attention_heads", hp.n_head},
                                                       {"num_key_value_heads", hp.n_head_kv},
                                                       {"head_dim", hp.head_dim}};
    for (const auto& [name, v] : bounded)
        if (v > k_llama_max_dim)
            return make_error(E_UNSUP, "{}: {} is {}, more than the {} supported", where, name, v, k_llama_max_dim);
    if (hp.n_head * hp.head_dim > (int64_t(1) << 31))
        return make_error(E_UNSUP, "{}: num_attention_heads x head_dim = {} x {} is too large", where, hp.n_head,
                          hp.head_dim);
    if (hp.n_head % hp.n_head_kv != 0)
        return make_error(E_UNSUP, "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", where,
                          hp.n_head, hp.n_head_kv);
    if (hp.head_dim % 2 != 0)
        return make_error(E_UNSUP, "{}: head_dim {} is odd; RoPE needs it even", where, hp.head_dim);
    if (!(hp.rope.theta > 0)) return make_error(E_ARG, "{}: rope_theta {} is not positive", where, hp.rope.theta);
    if (hp.rope.type == rope_type::ROPE_DYNAMIC && hp.max_position_embeddings <= 0)
        return make_error(E_ARG, "{}: dynamic RoPE needs max_position_embeddings, got {}", where,
                          hp.max_position_embeddings);
    if (hp.rope.type == rope_type::ROPE_LLAMA3) {
        const int64_t ctx = hp.rope.original_max_position_embeddings > 0 ? hp.rope.original_max_position_embeddings
                                                                         : hp.max_position_embeddings;
        if (ctx <= 0 || !(hp.rope.high_freq_factor > hp.rope.low_freq_factor) || !(hp.rope.low_freq_factor > 0))
            return make_error(E_ARG,
                              "{}: llama3 RoPE needs original_max_position_embeddings > 0 and high_freq_factor > "
                              "low_freq_factor > 0 (got {}, {}, {})",
                              where, ctx, hp.rope.high_freq_factor, hp.rope.low_freq_factor);
    }
    if (cfg.arch->moe.block) {
        hp.n_expert      = cfg.num_experts;
        hp.n_expert_used = cfg.num_experts_per_tok;
        hp.n_ff_expert   = cfg.moe_intermediate_size;
        hp.n_ff_shared   = cfg.shared_expert_intermediate_size;
        hp.moe_renorm    = cfg.norm_topk_prob;
        hp.moe_layer.resize(static_cast<size_t>(hp.n_layer));
        for (int64_t i = 0; i < hp.n_layer; ++i) hp.moe_layer[static_cast<size_t>(i)] = cfg.layer_is_moe(i);
    }
    hp.window.assign(static_cast<size_t>(hp.n_layer), 0);
    for (int64_t i = 0; i < hp.n_layer; ++i)
        if (cfg.layer_uses_sliding_window(i)) hp.window[static_cast<size_t>(i)] = *cfg.sliding_window;
    GPTQ_TRY(hparams_set_options(cfg, &hp));
    return hp;
}

std::vector<float> llama_rope_inv_freq(const llama_hparams& hp, int64_t seq_len) {
    return llama_rope_inv_freq(hp, hp.rope, seq_len);
}

float llama_rope_attention_factor(const rope_config& rope) {
    return rope.type == rope_type::ROPE_LONGROPE ? static_cast<float>(rope.attention_factor) : 1.0f;
}

std::vector<float> llama_rope_inv_freq(const llama_hparams& hp_in, const rope_config& rope, int64_t seq_len) {
    // The body reads hp.rope: a copy whose rope is this layer's.
    llama_hparams hp_copy;
    hp_copy.head_dim                = hp_in.head_dim;
    hp_copy.max_position_embeddings = hp_in.max_position_embeddings;
    hp_copy.rope                    = rope;
    const llama_hparams& hp         = hp_copy;
    const int64_t        half       = hp.head_dim / 2;
    const float          dim        = static_cast<float>(hp.head_dim);
    double               base       = hp.rope.theta;
    if (hp.rope.type == rope_type::ROPE_LONGROPE) {
        // transformers' _compute_longrope_parameters: 1 / (ext_factor * base ** (2i / dim)) in F32,
        // ext = long_factor once the sequence passes original_max_position_embeddings, else short.
        const bool                 is_long = seq_len > hp.rope.original_max_position_embeddings;
        const std::vector<double>& ext     = is_long ? hp.rope.long_factor : hp.rope.short_factor;
        std::vector<float>         inv(static_cast<size_t>(half));
        const float                base_f = static_cast<float>(base);
        for (int64_t i = 0; i < half; ++i) {
            const float e = static_cast<float>(2 * i) / dim;
            const float p = static_cast<float>(std::pow(static_cast<double>(base_f), static_cast<double>(e)));
            inv[static_cast<size_t>(i)] = 1.0f / (static_cast<float>(ext[static_cast<size_t>(i)]) * p);
        }
        return inv;
    }
    if (hp.rope.type == rope_type::ROPE_DYNAMIC) {
        // NTK-aware base growth once the sequence passes the original context (transformers'
        // _compute_dynamic_ntk_parameters); below it, the plain frequencies.
        const double orig =
            static_cast<double>(hp.rope.original_max_position_embeddings > 0 ? hp.rope.original_max_position_embeddings
                                                                             : hp.max_position_embeddings);
        const double f = hp.rope.factor;
        if (static_cast<double>(seq_len) > orig)
            base *= std::pow(f * static_cast<double>(seq_len) / orig - (f - 1.0), dim / (dim - 2.0));
    }
    std::vector<float> inv(static_cast<size_t>(half));
    const float        base_f = static_cast<float>(base);
    for (int64_t i = 0; i < half; ++i) {
        // F32 exactly as torch: base ** (arange(0, dim, 2).float() / dim), then 1 / that.
        const float e = static_cast<float>(2 * i) / dim;
        inv[static_cast<size_t>(i)] =
            1.0f / static_cast<float>(std::pow(static_cast<double>(base_f), static_cast<double>(e)));
    }
    if (hp.rope.type == rope_type::ROPE_LINEAR) {
        for (auto& x : inv) x /= static_cast<float>(hp.rope.factor);
    } else if (hp.rope.type == rope_type::ROPE_LLAMA3) {
        const float factor = static_cast<float>(hp.rope.factor);
        const float low    = static_cast<float>(hp.rope.low_freq_factor);
        const float high   = static_cast<float>(hp.rope.high_freq_factor);
        const float ctx =
            static_cast<float>(hp.rope.original_max_position_embeddings > 0 ? hp.rope.original_max_position_embeddings
                                                                            : hp.max_position_embeddings);
        const float low_wavelen  = ctx / low;   // longer wavelengths: divided by factor
        const float high_wavelen = ctx / high;  // shorter: unchanged; between: interpolated
        for (auto& x : inv) {
            const float wavelen = 2.0f * static_cast<float>(M_PI) / x;
            float       scaled  = wavelen > low_wavelen ? x / factor : x;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                const float smooth = (ctx / wavelen - low) / (high - low);
                scaled             = (1.0f - smooth) * scaled / factor + smooth * scaled;
            }
            x = scaled;
        }
    }
    return inv;
}

std::string llama_linear_name(int64_t i_layer, linear_role r) {
    return "model.layers." + std::to_string(i_layer) + (role_is_attention(r) ? ".self_attn." : ".mlp.") +
           linear_role_name(r);
}

bool llama_linear_has_bias(const llama_hparams& hp, linear_role r) {
    return role_has_bias(hp, r);
}

std::vector<tensor_spec> llama_global_tensors(const llama_hparams& hp) {
    return {
        {"model.embed_tokens.weight", {hp.n_vocab, hp.n_embd}, false},
        {"model.norm.weight", {hp.n_embd}, false},
        {"lm_head.weight", {hp.n_vocab, hp.n_embd}, hp.tie_embeddings},
    };
}

linear_slot llama_linear_slot(const llama_hparams& hp, int64_t i_layer, linear_role r) {
    const std::string p = "model.layers." + std::to_string(i_layer);
    switch (r) {
        case linear_role::LINEAR_Q:
        case linear_role::LINEAR_K:
        case linear_role::LINEAR_V:
            if (hp.fused_qkv) {
                const int64_t row0 = r == linear_role::LINEAR_Q   ? 0
                                     : r == linear_role::LINEAR_K ? hp.q_dim()
                                                                  : hp.q_dim() + hp.kv_dim();
                return {p + ".self_attn.qkv_proj", row0, hp.q_dim() + 2 * hp.kv_dim()};
            }
            break;
        case linear_role::LINEAR_GATE:
        case linear_role::LINEAR_UP:
            if (hp.fused_gate_up)
                return {p + ".mlp.gate_up_proj", r == linear_role::LINEAR_GATE ? 0 : hp.n_ff, 2 * hp.n_ff};
            break;
        default:
            break;
    }
    return {llama_linear_name(i_layer, r), 0, hp.linear_shape(r)[0]};
}

std::vector<linear_module> llama_linear_modules(const llama_hparams& hp, int64_t i_layer) {
    std::vector<linear_module> out;
    for (int r = 0; r < k_n_linear_roles; ++r) {
        const auto role = static_cast<linear_role>(r);
        if (!role_is_attention(role) && hp.is_moe(i_layer)) break;  // the sparse block replaces the MLP
        linear_slot s = llama_linear_slot(hp, i_layer, role);
        if (!out.empty() && out.back().module == s.module)
            out.back().roles.push_back(role);
        else
            out.push_back({std::move(s.module), {role}});
    }
    return out;
}

namespace {
// A layer's norms: checkpoint name (relative to "model.layers.<i>.") and length; which exist is
// the family's arch_norm_names and qk_norm.
enum class norm_slot : uint8_t { NORM_ATTN_IN, NORM_ATTN_OUT, NORM_MLP_IN, NORM_MLP_OUT, NORM_Q, NORM_K };
const char* norm_slot_name(const llama_hparams& hp, norm_slot n) {
    switch (n) {
        case norm_slot::NORM_ATTN_IN:
            return hp.arch->norms.attn_in;
        case norm_slot::NORM_ATTN_OUT:
            return hp.arch->norms.attn_out;
        case norm_slot::NORM_MLP_IN:
            return hp.arch->norms.mlp_in;
        case norm_slot::NORM_MLP_OUT:
            return hp.arch->norms.mlp_out;
        case norm_slot::NORM_Q:
            return hp.qk_norm ? "self_attn.q_norm" : nullptr;
        case norm_slot::NORM_K:
            return hp.qk_norm ? "self_attn.k_norm" : nullptr;
    }
    return nullptr;
}
constexpr norm_slot        k_norm_slots[] = {norm_slot::NORM_ATTN_IN, norm_slot::NORM_ATTN_OUT, norm_slot::NORM_MLP_IN,
                                             norm_slot::NORM_MLP_OUT, norm_slot::NORM_Q,        norm_slot::NORM_K};
std::optional<tensor_spec> norm_spec(const llama_hparams& hp, int64_t i_layer, norm_slot n) {
    const char* name = norm_slot_name(hp, n);
    if (!name) return std::nullopt;
    const int64_t len = n == norm_slot::NORM_Q || n == norm_slot::NORM_K ? hp.head_dim : hp.n_embd;
    return tensor_spec{"model.layers." + std::to_string(i_layer) + "." + name + ".weight", {len}, false};
}
}  // namespace

const char* moe_proj_name(moe_proj p) {
    switch (p) {
        case moe_proj::MOE_GATE:
            return "gate";
        case moe_proj::MOE_UP:
            return "up";
        case moe_proj::MOE_DOWN:
            return "down";
    }
    return "?";
}

namespace {
std::string moe_prefix(const llama_hparams& hp, int64_t i_layer) {
    return "model.layers." + std::to_string(i_layer) + "." + hp.arch->moe.block;
}
}  // namespace

std::string llama_moe_router_name(const llama_hparams& hp, int64_t i_layer) {
    return moe_prefix(hp, i_layer) + "." + hp.arch->moe.router;
}

std::string llama_moe_expert_name(const llama_hparams& hp, int64_t i_layer, int64_t expert, moe_proj p) {
    const arch_moe_desc& m = hp.arch->moe;
    if (expert == k_moe_shared)  // Qwen2MoeMLP's names
        return moe_prefix(hp, i_layer) + ".shared_expert." +
               (p == moe_proj::MOE_GATE ? "gate_proj"
                : p == moe_proj::MOE_UP ? "up_proj"
                                        : "down_proj");
    return moe_prefix(hp, i_layer) + ".experts." + std::to_string(expert) + "." +
           (p == moe_proj::MOE_GATE ? m.expert_gate
            : p == moe_proj::MOE_UP ? m.expert_up
                                    : m.expert_down);
}

std::string llama_moe_shared_gate_name(const llama_hparams& hp, int64_t i_layer) {
    return moe_prefix(hp, i_layer) + ".shared_expert_gate";
}

std::array<int64_t, 2> llama_moe_shape(const llama_hparams& hp, int64_t expert, moe_proj p) {
    const int64_t ff = expert == k_moe_shared ? hp.n_ff_shared : hp.n_ff_expert;
    return p == moe_proj::MOE_DOWN ? std::array<int64_t, 2>{hp.n_embd, ff} : std::array<int64_t, 2>{ff, hp.n_embd};
}

std::vector<tensor_spec> llama_layer_tensors(const llama_hparams& hp, int64_t i_layer) {
    std::vector<tensor_spec> t;
    for (norm_slot n : k_norm_slots)
        if (auto spec = norm_spec(hp, i_layer, n)) t.push_back(std::move(*spec));
    for (const linear_module& m : llama_linear_modules(hp, i_layer)) {
        const linear_slot s    = llama_linear_slot(hp, i_layer, m.roles[0]);
        const int64_t     n_in = hp.linear_shape(m.roles[0])[1];
        t.push_back({m.module + ".weight", {s.n_out_module, n_in}, false});
        if (role_has_bias(hp, m.roles[0])) t.push_back({m.module + ".bias", {s.n_out_module}, false});
    }
    if (hp.is_moe(i_layer)) {
        t.push_back({llama_moe_router_name(hp, i_layer) + ".weight", {hp.n_expert, hp.n_embd}, false});
        const int64_t first = hp.n_ff_shared > 0 ? k_moe_shared : 0;
        for (int64_t e = first; e < hp.n_expert; ++e)
            for (moe_proj p : {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN}) {
                const auto shp = llama_moe_shape(hp, e, p);
                t.push_back({llama_moe_expert_name(hp, i_layer, e, p) + ".weight", {shp[0], shp[1]}, false});
            }
        if (hp.n_ff_shared > 0)
            t.push_back({llama_moe_shared_gate_name(hp, i_layer) + ".weight", {1, hp.n_embd}, false});
    }
    return t;
}

std::vector<moe_linear> llama_moe_linears(const llama_hparams& hp, int64_t i_layer) {
    std::vector<moe_linear> out;
    if (!hp.is_moe(i_layer)) return out;
    const int64_t first = hp.n_ff_shared > 0 ? k_moe_shared : 0;
    for (int64_t e = first; e < hp.n_expert; ++e)
        for (moe_proj p : {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN})
            out.push_back({llama_moe_expert_name(hp, i_layer, e, p), e, p});
    return out;
}

status llama_layer::linear_replace(linear_role r, std::vector<float> w) {
    linear_weights& l = linear(r);
    if (static_cast<int64_t>(w.size()) != l.n_out * l.n_in)
        return make_error(E_ARG, "layer {} {}: replacement weight has {} values, expected [{}, {}] = {}", index,
                          linear_role_name(r), w.size(), l.n_out, l.n_in, l.n_out * l.n_in);
    l.w = std::move(w);
    l.w16.clear();
    l.q.reset();
    return status::ok();
}

std::vector<float> linear_weights::dense() const {
    if (!w16.empty()) {
        std::vector<float> out(w16.size());
        f16_to_f32_row(w16.data(), out.data(), w16.size());
        return out;
    }
    if (!q) return w;
    std::vector<float> out(static_cast<size_t>(n_out * n_in));
    q->dequantize(out.data());
    return out;
}

void linear_forward(const ops_context& ctx, const linear_weights& l, const float* x, float* y, int64_t n_rows) {
    const float* bias = l.bias.empty() ? nullptr : l.bias.data();
    if (l.q)
        op_gptq_linear(ctx, x, *l.q, bias, y, n_rows);
    else if (!l.w16.empty())
        op_linear_f16(ctx, x, l.w16.data(), bias, y, n_rows, l.n_out, l.n_in);
    else
        op_linear(ctx, x, l.w.data(), bias, y, n_rows, l.n_out, l.n_in);
}

kv_cache kv_cache::create(const llama_hparams& hp, int64_t n_ctx, bool f16) {
    kv_cache     c;
    const size_t n_layer = static_cast<size_t>(hp.n_layer), n = static_cast<size_t>(n_ctx * hp.kv_dim());
    c.n_ctx  = n_ctx;
    c.kv_dim = hp.kv_dim();
    c.f16    = f16;
    if (f16) {
        c.k16.assign(n_layer, std::vector<uint16_t>(n));
        c.v16.assign(n_layer, std::vector<uint16_t>(n));
    } else {
        c.k.assign(n_layer, std::vector<float>(n));
        c.v.assign(n_layer, std::vector<float>(n));
    }
    return c;
}

uint64_t kv_cache::bytes_per_position(const llama_hparams& hp, bool f16) {
    return 2ull * static_cast<uint64_t>(hp.n_layer * hp.kv_dim()) * (f16 ? sizeof(uint16_t) : sizeof(float));
}

namespace {
// The layer index of "model.layers.<i>.<rest>", or -1 for another name (or an index that is not a
// plain decimal number that fits).
int64_t layer_index_of(const std::string& name) {
    static constexpr std::string_view k_prefix = "model.layers.";
    if (name.compare(0, k_prefix.size(), k_prefix) != 0) return -1;
    int64_t i = 0;
    size_t  p = k_prefix.size();
    for (; p < name.size() && name[p] >= '0' && name[p] <= '9' && p < k_prefix.size() + 9; ++p)
        i = 10 * i + (name[p] - '0');
    return p > k_prefix.size() && p < name.size() && name[p] == '.' ? i : -1;
}

status check_zero_bias(const tensor_source& src, const std::string& name, const std::string& config_path) {
    const tensor_entry* e = src.find(name);
    std::vector<float>  b(static_cast<size_t>(e->info->numel()));
    GPTQ_TRY(src.read_f32(name, b.data()));
    for (size_t k = 0; k < b.size(); ++k)
        if (b[k] != 0.0f)
            return make_error(status_code::STATUS_PARSE_ERROR,
                              "{}: tensor '{}' holds a non-zero value ({} at element {}), but {} gives this linear no "
                              "bias (attention_bias / mlp_bias): the model would run without it",
                              e->file->path(), name, b[k], k, config_path);
    return status::ok();
}

// Every tensor of the checkpoint must be one the model reads (or knows to skip): a layer past
// config.json's num_hidden_layers is an error (the files and the config disagree: running fewer
// layers would be a silent wrong answer); other unknown tensors are a warning, an error if strict.
status check_tensor_names(const tensor_source& src, const llama_hparams& hp, const std::string& config_path,
                          bool strict) {
    std::set<std::string> known;
    std::set<std::string> linears;  // module names of every linear ("model.layers.0.self_attn.q_proj")
    auto                  add = [&](const tensor_spec& t) {
        known.insert(t.name);
        const size_t dot = t.name.rfind('.');
        if (t.name.compare(dot, std::string::npos, ".weight") == 0 && t.shape.size() == 2) {
            linears.insert(t.name.substr(0, dot));
            for (const char* suffix : {".qweight", ".qzeros", ".scales", ".g_idx"})  // format.md 1.2
                known.insert(t.name.substr(0, dot) + suffix);
        }
    };
    for (const auto& t : llama_global_tensors(hp)) add(t);
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        for (const auto& t : llama_layer_tensors(hp, i)) add(t);
        // Buffers that older transformers saved and that are recomputed from the config.
        known.insert("model.layers." + std::to_string(i) + ".self_attn.rotary_emb.inv_freq");
    }
    int64_t                  max_layer = -1;
    std::string              max_layer_name;
    std::vector<std::string> unknown;
    for (const auto& name : src.names()) {
        if (known.count(name)) continue;
        if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0 &&
            linears.count(name.substr(0, name.size() - 5))) {
            // A bias on a linear the architecture gives none: AutoGPTQ writes zero ones for every
            // linear, which change nothing; a non-zero one would be dropped silently: an error.
            GPTQ_TRY(check_zero_bias(src, name, config_path));
            continue;
        }
        const int64_t i = layer_index_of(name);
        if (i >= hp.n_layer) {
            if (i > max_layer) max_layer = i, max_layer_name = name;
            continue;
        }
        unknown.push_back(name);
    }
    if (max_layer >= 0)
        return make_error(status_code::STATUS_PARSE_ERROR,
                          "{}: num_hidden_layers is {} but the weights hold layers up to {} ('{}' in {}); the config "
                          "and the weights disagree",
                          config_path, hp.n_layer, max_layer, max_layer_name, src.find(max_layer_name)->file->path());
    if (unknown.empty()) return status::ok();
    std::string list;
    for (size_t k = 0; k < unknown.size() && k < 5; ++k) list += (k ? ", '" : "'") + unknown[k] + "'";
    if (unknown.size() > 5) list += fmt::format(" and {} more", unknown.size() - 5);
    if (strict)
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: {} tensor{} the model does not use: {} (--strict)",
                          src.path(), unknown.size(), unknown.size() == 1 ? "" : "s", list);
    GPTQ_LOG_WARN("{}: {} tensor{} the model does not use, ignored (--strict makes this an error): {}", src.path(),
                  unknown.size(), unknown.size() == 1 ? "" : "s", list);
    return status::ok();
}

bool module_stored(const tensor_source& src, const std::string& module) {
    return src.has(module + ".weight") || src.has(module + ".qweight");
}

// The checkpoint decides whether a family's fused modules are stored fused: GPTQModel 7.6 splits
// Phi-3's mlp.gate_up_proj into mlp.gate_proj and mlp.up_proj before quantizing (its "defuser")
// and writes them so, while transformers' own files (and ours) keep gate_up_proj
// (docs/interop.md "New families"). Layer 0 decides; a layer stored the other way is then a
// missing tensor, named at load.
void fused_layout_from_checkpoint(const tensor_source& src, llama_hparams* hp) {
    if (hp->n_layer < 1) return;
    auto split_stored = [&](linear_role first, std::initializer_list<linear_role> parts) {
        if (module_stored(src, llama_linear_slot(*hp, 0, first).module)) return false;
        for (linear_role r : parts)
            if (!module_stored(src, llama_linear_name(0, r))) return false;
        return true;
    };
    if (hp->fused_qkv &&
        split_stored(linear_role::LINEAR_Q, {linear_role::LINEAR_Q, linear_role::LINEAR_K, linear_role::LINEAR_V})) {
        hp->fused_qkv = false;
        GPTQ_LOG_INFO("{}: q_proj, k_proj and v_proj stored apart (not as self_attn.qkv_proj)", src.path());
    }
    if (hp->fused_gate_up &&
        split_stored(linear_role::LINEAR_GATE, {linear_role::LINEAR_GATE, linear_role::LINEAR_UP})) {
        hp->fused_gate_up = false;
        GPTQ_LOG_INFO("{}: gate_proj and up_proj stored apart (not as mlp.gate_up_proj)", src.path());
    }
}
}  // namespace

result<std::unique_ptr<llama_model>> llama_model::open(const std::string& path, const llama_open_options& options) {
    std::unique_ptr<llama_model> m(new llama_model());
    GPTQ_ASSIGN_OR_RETURN(m->cfg_, model_config_load(path));
    GPTQ_ASSIGN_OR_RETURN(m->hp_, llama_hparams_from_config(m->cfg_));
    {
        // Which files, GPTQ or not, each module's settings checked against its tensors: the one
        // detector every command uses (io/checkpoint.h).
        GPTQ_ASSIGN_OR_RETURN(checkpoint_info ck, checkpoint_detect(path));
        GPTQ_TRY(ck.check());
        ck.log_warnings();
        m->src_          = std::move(ck.source);
        m->gptq_         = std::move(ck.gptq);
        m->gptq_modules_ = std::move(ck.modules);
        if (m->gptq_) {  // v1/v2 zeros from the data (io/gptq_zero_format.h), for every module
            GPTQ_TRY(gptq_zero_format_resolve(*m->src_, &*m->gptq_).to_status());
            for (auto& [name, c] : m->gptq_modules_) c.format = m->gptq_->format;
        }
    }
    fused_layout_from_checkpoint(*m->src_, &m->hp_);
    std::vector<tensor_spec> all = llama_global_tensors(m->hp_);
    for (int64_t i = 0; i < m->hp_.n_layer; ++i) {
        auto l = llama_layer_tensors(m->hp_, i);
        all.insert(all.end(), l.begin(), l.end());
    }
    for (const auto& t : all) {
        // A GPTQ linear has .qweight/.qzeros/.scales/.g_idx instead of .weight (checked at load).
        if (t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".weight") == 0 &&
            m->quantization_of(std::string_view(t.name).substr(0, t.name.size() - 7)))
            continue;
        const tensor_entry* e = m->src_->find(t.name);
        if (!e) {
            if (t.optional) continue;
            // transformers 5 holds a MoE layer's experts stacked in memory (experts.gate_up_proj
            // [E, 2 ff, hidden], experts.down_proj); its save_pretrained writes one linear per
            // expert, the only layout read here (docs/architectures.md "Mixture of experts").
            const size_t at = t.name.find(".experts.");
            if (at != std::string::npos && (m->src_->has(t.name.substr(0, at) + ".experts.gate_up_proj") ||
                                            m->src_->has(t.name.substr(0, at) + ".experts.down_proj")))
                return make_error(E_UNSUP,
                                  "{}: tensor '{}' is missing: the checkpoint stores the experts stacked ('{}'), "
                                  "transformers' in-memory layout; only one linear per expert (as save_pretrained "
                                  "and GPTQModel write them) is read",
                                  path, t.name, t.name.substr(0, at) + ".experts.gate_up_proj");
            return make_error(status_code::STATUS_NOT_FOUND, "{}: tensor '{}' (shape {}) is missing", path, t.name,
                              fmt::join(t.shape, ", "));
        }
        if (e->info->shape != t.shape)
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: tensor '{}' has shape [{}], expected [{}]",
                              e->file->path(), t.name, fmt::join(e->info->shape, ", "), fmt::join(t.shape, ", "));
        const dtype ty = e->info->type;
        if (ty != dtype::DTYPE_F32 && ty != dtype::DTYPE_F16 && ty != dtype::DTYPE_BF16)
            return make_error(E_UNSUP, "{}: tensor '{}' has dtype {}; the model runtime reads F32, F16 or BF16",
                              e->file->path(), t.name, dtype_name(ty));
    }
    GPTQ_TRY(check_tensor_names(*m->src_, m->hp_, m->cfg_.path, options.strict));
    m->layers_.resize(static_cast<size_t>(m->hp_.n_layer));
    m->keep_f16_ = options.keep_f16;
    return m;
}

const gptq_config* llama_model::quantization_of(std::string_view module) const {
    auto it = gptq_modules_.find(module);
    return it == gptq_modules_.end() ? nullptr : &it->second;
}

namespace {
// A GPTQ linear as read by io, kept quantized (codes, F32 scales).
std::shared_ptr<const gptq_packed_linear> gptq_packed(const gptq_linear_data& q) {
    std::vector<float> scales(q.scales.size());
    for (size_t j = 0; j < scales.size(); ++j) scales[j] = f16_to_f32(q.scales[j]);
    return std::make_shared<const gptq_packed_linear>(gptq_packed_linear::from_unpacked(
        q.codes.data(), scales.data(), q.zeros.data(), q.g_idx.data(), q.n_out, q.n_in, q.n_groups, q.bits));
}

status read_vec(const tensor_source& src, const tensor_spec& t, std::vector<float>* out) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    out->resize(static_cast<size_t>(n));
    return src.read_f32(t.name, out->data(), t.shape);
}

bool tensor_is_f16(const tensor_source& src, const std::string& name) {
    const tensor_entry* e = src.find(name);
    return e && e->info->type == dtype::DTYPE_F16;
}

// A weight kept F16 (keep_f16 and an F16 tensor): its bytes copied into *w16 (no F32 copy, even
// transient) after the same finite-values check as read_f32, *w left empty; otherwise read into
// *w as F32.
status read_weight(const tensor_source& src, const tensor_spec& t, bool keep_f16, std::vector<float>* w,
                   std::vector<uint16_t>* w16) {
    if (!keep_f16 || !tensor_is_f16(src, t.name)) return read_vec(src, t, w);
    GPTQ_ASSIGN_OR_RETURN(tensor_entry e, src.get(t.name));
    if (e.info->shape != t.shape)
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: tensor '{}' has shape [{}], expected [{}]",
                          e.file->path(), t.name, fmt::join(e.info->shape, ", "), fmt::join(t.shape, ", "));
    GPTQ_TRY(e.file->check_finite(*e.info));
    w16->resize(static_cast<size_t>(e.info->numel()));
    e.file->copy_to(*e.info, w16->data());
    return status::ok();
}

}  // namespace

result<std::unique_ptr<llama_layer>> llama_model::layer_load(int64_t i_layer, thread_pool* pool) const {
    if (i_layer < 0 || i_layer >= hp_.n_layer)
        return make_error(E_ARG, "{}: layer {} out of range (the model has {})", src_->path(), i_layer, hp_.n_layer);
    auto layer                  = std::make_unique<llama_layer>();
    layer->index                = i_layer;
    std::vector<float>* norms[] = {&layer->attn_norm,    &layer->attn_out_norm, &layer->mlp_norm,
                                   &layer->mlp_out_norm, &layer->q_norm,        &layer->k_norm};
    for (size_t n = 0; n < std::size(k_norm_slots); ++n) {
        auto spec = norm_spec(hp_, i_layer, k_norm_slots[n]);
        if (!spec) continue;
        GPTQ_TRY(read_vec(*src_, *spec, norms[n]));
        // (1 + w) in F32 as transformers computes it (1.0 + weight.float()), so folding is exact.
        if (hp_.norm_plus_one)
            for (float& w : *norms[n]) w = 1.0f + w;
    }
    // One checkpoint module per task (reads of the memory-mapped files are independent), sliced
    // into its roles' rows when fused; the first error wins.
    const std::vector<linear_module> modules     = llama_linear_modules(hp_, i_layer);
    auto                             load_module = [&](const linear_module& m) -> status {
        const linear_slot               s0    = llama_linear_slot(hp_, i_layer, m.roles[0]);
        const int64_t                   n_in  = hp_.linear_shape(m.roles[0])[1];
        const int64_t                   n_all = s0.n_out_module;
        const bool                      bias  = role_has_bias(hp_, m.roles[0]);
        std::vector<float>              w, b;
        std::vector<uint16_t>           w16;
        std::optional<gptq_linear_data> q;
        if (const gptq_config* qc = quantization_of(m.module)) {
            GPTQ_ASSIGN_OR_RETURN(q, gptq_linear_read(*src_, m.module, n_all, n_in, *qc));
        } else {
            GPTQ_TRY(read_weight(*src_, {m.module + ".weight", {n_all, n_in}, false}, keep_f16_, &w, &w16));
        }
        if (bias) GPTQ_TRY(read_vec(*src_, {m.module + ".bias", {n_all}, false}, &b));
        for (linear_role role : m.roles) {
            const linear_slot s     = llama_linear_slot(hp_, i_layer, role);
            const int64_t     n_out = hp_.linear_shape(role)[0];
            linear_weights&   l     = layer->linear(role);
            l.n_out                 = n_out;
            l.n_in                  = n_in;
            if (q) {
                l.q = m.roles.size() == 1 ? gptq_packed(*q) : gptq_packed(gptq_linear_rows(*q, s.row0, n_out));
            } else if (!w16.empty()) {
                l.w16.assign(w16.begin() + s.row0 * n_in, w16.begin() + (s.row0 + n_out) * n_in);
            } else if (m.roles.size() == 1) {
                l.w = std::move(w);
            } else {
                l.w.assign(w.begin() + s.row0 * n_in, w.begin() + (s.row0 + n_out) * n_in);
            }
            if (bias) l.bias.assign(b.begin() + s.row0, b.begin() + s.row0 + n_out);
        }
        return status::ok();
    };
    // The MoE block's linears (router, experts, shared expert and its gate), each dense or GPTQ.
    struct moe_task {
        std::string     module;
        linear_weights* l;
        int64_t         n_out, n_in;
    };
    std::vector<moe_task> moe_tasks;
    if (hp_.is_moe(i_layer)) {
        layer->moe     = std::make_unique<llama_moe>();
        llama_moe& moe = *layer->moe;
        moe.experts.resize(static_cast<size_t>(hp_.n_expert));
        moe_tasks.push_back({llama_moe_router_name(hp_, i_layer), &moe.router, hp_.n_expert, hp_.n_embd});
        for (const moe_linear& ml : llama_moe_linears(hp_, i_layer)) {
            const auto shp = llama_moe_shape(hp_, ml.expert, ml.proj);
            moe_tasks.push_back({ml.module, &moe.expert(ml.expert).linear(ml.proj), shp[0], shp[1]});
        }
        if (hp_.n_ff_shared > 0)
            moe_tasks.push_back({llama_moe_shared_gate_name(hp_, i_layer), &moe.shared_gate, 1, hp_.n_embd});
    }
    auto load_moe = [&](const moe_task& t) -> status {
        t.l->n_out = t.n_out;
        t.l->n_in  = t.n_in;
        if (const gptq_config* qc = quantization_of(t.module)) {
            GPTQ_ASSIGN_OR_RETURN(gptq_linear_data q, gptq_linear_read(*src_, t.module, t.n_out, t.n_in, *qc));
            t.l->q = gptq_packed(q);
            return status::ok();
        }
        return read_vec(*src_, {t.module + ".weight", {t.n_out, t.n_in}, false}, &t.l->w);
    };
    const size_t        n_tasks = modules.size() + moe_tasks.size();
    std::vector<status> st(n_tasks);
    auto                task = [&](size_t r) {
        st[r] = r < modules.size() ? load_module(modules[r]) : load_moe(moe_tasks[r - modules.size()]);
    };
    if (pool) {
        pool->parallel_for(static_cast<int64_t>(n_tasks), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) task(static_cast<size_t>(r));
        });
    } else {
        for (size_t r = 0; r < n_tasks; ++r) task(r);
    }
    for (const auto& x : st) GPTQ_TRY(x);
    return layer;
}

status llama_model::layers_load_all() {
    for (int64_t i = 0; i < hp_.n_layer; ++i) {
        if (layers_[static_cast<size_t>(i)]) continue;
        GPTQ_ASSIGN_OR_RETURN(layers_[static_cast<size_t>(i)], layer_load(i));
    }
    return status::ok();
}

status llama_read_quantized_embedding(const tensor_source& src, const llama_hparams& hp, const gptq_config& qc,
                                      std::vector<float>* table) {
    // E^T: n_out = n_embd, n_in = n_vocab (groups of consecutive token ids).
    GPTQ_ASSIGN_OR_RETURN(gptq_linear_data q, gptq_linear_read(src, "model.embed_tokens", hp.n_embd, hp.n_vocab, qc));
    std::vector<float> wt(static_cast<size_t>(hp.n_embd * hp.n_vocab));
    q.dequantize(wt.data());  // [n_embd, n_vocab]
    table->resize(wt.size());
    for (int64_t d = 0; d < hp.n_embd; ++d)
        for (int64_t v = 0; v < hp.n_vocab; ++v) (*table)[size_t(v * hp.n_embd + d)] = wt[size_t(d * hp.n_vocab + v)];
    return status::ok();
}

status llama_model::globals_load() {
    if (!embed_.empty() || !embed16_.empty()) return status::ok();
    const auto specs = llama_global_tensors(hp_);
    if (const gptq_config* qe = quantization_of("model.embed_tokens"))
        GPTQ_TRY(llama_read_quantized_embedding(*src_, hp_, *qe, &embed_).with_context(src_->folder()));
    else
        GPTQ_TRY(read_weight(*src_, specs[0], keep_f16_, &embed_, &embed16_));
    GPTQ_TRY(read_vec(*src_, specs[1], &norm_));
    if (hp_.norm_plus_one)
        for (float& w : norm_) w = 1.0f + w;  // as the layers' norms (layer_load)
    lm_head_.n_out = hp_.n_vocab;
    lm_head_.n_in  = hp_.n_embd;
    if (const gptq_config* qc = quantization_of("lm_head")) {  // used even when config.json ties it
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data q, gptq_linear_read(*src_, "lm_head", hp_.n_vocab, hp_.n_embd, *qc));
        lm_head_.q = gptq_packed(q);
    } else if (!hp_.tie_embeddings) {
        GPTQ_TRY(read_weight(*src_, specs[2], keep_f16_, &lm_head_.w, &lm_head_.w16));
    }
    return status::ok();
}

uint64_t llama_model::resident_bytes() const {
    auto elems = [](const tensor_spec& t) {
        uint64_t n = 1;
        for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
        return n;
    };
    // A GPTQ linear: nibble codes (bytes for 8 bits; each group padded to 32 rows), F32 scale +
    // zero per group, group starts and the act-order permutation (gptq_packed_linear). A dense
    // tensor: F16 when kept F16 (keep_f16 and an F16 checkpoint tensor of a 2-D weight), else F32.
    auto bytes = [&](const tensor_spec& t) -> uint64_t {
        const std::string module = t.name.substr(0, t.name.rfind('.'));
        if (module == "model.embed_tokens" && quantization_of(module)) return 4 * elems(t);  // read dense (F32)
        const gptq_config* qc = t.shape.size() == 2 ? quantization_of(module) : nullptr;
        if (!qc) return (keep_f16_ && t.shape.size() == 2 && tensor_is_f16(*src_, t.name) ? 2 : 4) * elems(t);
        const int64_t  n_in = t.shape[1];
        const uint64_t n_groups =
            qc->group_size > 0 ? static_cast<uint64_t>((n_in + qc->group_size - 1) / qc->group_size) : 1;
        const uint64_t k_pad = static_cast<uint64_t>(n_in) + 31 * n_groups;  // at most
        // bits <= 4: the tiled layout pads the outputs to a multiple of 16 (kernels/cpu/gptq_linear.h)
        const uint64_t n_out =
            qc->bits == 8 ? static_cast<uint64_t>(t.shape[0]) : (static_cast<uint64_t>(t.shape[0]) + 15) / 16 * 16;
        return (qc->bits == 8 ? k_pad : k_pad / 2 + 1) * n_out + 8 * n_groups * n_out +
               4 * static_cast<uint64_t>(n_in) + 8 * n_groups;
    };
    uint64_t total = 0;
    for (const auto& t : llama_global_tensors(hp_))
        if (!(hp_.tie_embeddings && t.name.find("lm_head") != std::string::npos) || quantization_of("lm_head"))
            total += bytes(t);
    for (int64_t i = 0; i < hp_.n_layer; ++i)
        for (const auto& t : llama_layer_tensors(hp_, i)) total += bytes(t);
    return total;
}

status llama_model::embed(const int32_t* ids, int64_t n_tokens, float* out) {
    GPTQ_TRY(globals_load());
    for (int64_t t = 0; t < n_tokens; ++t) {
        const int32_t id = ids[t];
        if (id < 0 || id >= hp_.n_vocab)
            return make_error(E_ARG, "token id {} at position {} is outside the vocabulary [0, {})", id, t,
                              hp_.n_vocab);
        const int64_t row = static_cast<int64_t>(id) * hp_.n_embd;
        if (!embed16_.empty())
            f16_to_f32_row(embed16_.data() + row, out + t * hp_.n_embd, static_cast<size_t>(hp_.n_embd));
        else
            std::copy_n(embed_.data() + row, hp_.n_embd, out + t * hp_.n_embd);
    }
    if (hp_.embed_scale != 1.0f)
        for (int64_t k = 0; k < n_tokens * hp_.n_embd; ++k) out[k] *= hp_.embed_scale;
    return status::ok();
}

void llama_model::final_norm(const ops_context& ctx, const float* hidden, int64_t n_tokens, float* out) const {
    GPTQ_ASSERT(!norm_.empty());  // globals_load() first
    op_rms_norm(ctx, hidden, norm_.data(), out, n_tokens, hp_.n_embd, hp_.rms_eps);
}

result<std::vector<float>> llama_model::lm_head_dense_weight() const {
    if (lm_head_.q) return make_error(E_ARG, "{}: lm_head is already GPTQ-quantized", src_->folder());
    if (embed_.empty()) return make_error(status_code::STATUS_INTERNAL, "lm_head_dense_weight before globals_load");
    return hp_.tie_embeddings ? embed_ : lm_head_.w;
}

void llama_model::output_logits(const ops_context& ctx, const float* hidden, int64_t n_tokens, float* logits) const {
    GPTQ_ASSERT(!embed_.empty() || !embed16_.empty());  // globals_load() first
    std::vector<float> x(static_cast<size_t>(n_tokens * hp_.n_embd));
    final_norm(ctx, hidden, n_tokens, x.data());
    if (lm_head_.q || !lm_head_.w16.empty()) {
        linear_forward(ctx, lm_head_, x.data(), logits, n_tokens);
    } else if (hp_.tie_embeddings && !embed16_.empty()) {
        op_linear_f16(ctx, x.data(), embed16_.data(), nullptr, logits, n_tokens, hp_.n_vocab, hp_.n_embd);
    } else {
        const float* w = hp_.tie_embeddings ? embed_.data() : lm_head_.w.data();
        op_linear(ctx, x.data(), w, nullptr, logits, n_tokens, hp_.n_vocab, hp_.n_embd);
    }
    if (hp_.final_softcap > 0.0f)  // Gemma: cap * tanh(logits / cap), in F32
        op_softcap(ctx, logits, n_tokens * hp_.n_vocab, hp_.final_softcap);
}

bool llama_model::rope_needs_reprefill(int64_t n_past, int64_t n_tokens) const {
    const rope_config* ropes[] = {&hp_.rope, &hp_.rope_local};
    for (const rope_config* r : ropes) {
        if (r == &hp_.rope_local && !hp_.rope_local_differs) continue;
        if (r->type != rope_type::ROPE_LONGROPE) continue;
        const int64_t orig = r->original_max_position_embeddings;
        if (n_past > 0 && n_past <= orig && n_past + n_tokens > orig) return true;
    }
    return false;
}

status llama_model::forward(const ops_context& ctx, const int32_t* ids, int64_t n_tokens, kv_cache* cache,
                            float* logits, int32_t lora) {
    if (lora < -1 || lora >= static_cast<int32_t>(loras_.size()))
        return make_error(E_ARG, "LoRA adapter {} is not loaded ({} are)", lora, loras_.size());
    if (cache && rope_needs_reprefill(cache->n_past, n_tokens)) {
        // Every cached token again with the long factors (transformers drops its cache here).
        if (static_cast<int64_t>(cache->ids.size()) != cache->n_past)
            return make_error(E_ARG, "LongRoPE: the KV cache holds {} positions but {} token ids", cache->n_past,
                              cache->ids.size());
        std::vector<int32_t> all = cache->ids;
        all.insert(all.end(), ids, ids + n_tokens);
        cache->clear();
        const int64_t      n_all = static_cast<int64_t>(all.size());
        std::vector<float> all_logits(static_cast<size_t>(n_all * hp_.n_vocab));
        GPTQ_TRY(forward(ctx, all.data(), n_all, cache, all_logits.data(), lora));
        std::copy_n(all_logits.data() + (n_all - n_tokens) * hp_.n_vocab, n_tokens * hp_.n_vocab, logits);
        return status::ok();
    }
    const int64_t pos0 = cache ? cache->n_past : 0;
    if (cache && pos0 + n_tokens > cache->n_ctx)
        return make_error(E_ARG, "{} tokens after {} cached ones exceed the cache's {} positions", n_tokens, pos0,
                          cache->n_ctx);
    const layer_seq    seq{n_tokens, pos0, cache, lora};  // a batch of one
    std::vector<float> hidden;                            // [n_tokens, n_embd]
    GPTQ_TRY(layers_run(ctx, ids, std::span<const layer_seq>(&seq, 1), &hidden));
    if (cache) {
        cache->n_past += n_tokens;
        cache->ids.insert(cache->ids.end(), ids, ids + n_tokens);
    }
    output_logits(ctx, hidden.data(), n_tokens, logits);
    return status::ok();
}

}  // namespace gptq
