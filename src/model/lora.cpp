// PEFT LoRA adapters (lora.h): reading adapter_config.json + adapter_model.safetensors onto a
// model's linears, stacking several into one, and the CPU product. docs/lora.md.
#include "model/lora.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"

namespace gptq {

namespace {

constexpr status_code E_ARG   = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_UNSUP = status_code::STATUS_UNSUPPORTED;
constexpr status_code E_PARSE = status_code::STATUS_PARSE_ERROR;

// What adapter_config.json says that the product needs.
struct lora_config {
    int64_t r      = 0;
    double  alpha  = 0;
    bool    rslora = false;
    float   scale() const { return static_cast<float>(rslora ? alpha / std::sqrt(double(r)) : alpha / double(r)); }
};

// A key whose presence with a non-empty value means a variant we do not run.
bool json_set(const json& obj, const char* key) {
    if (!obj.contains(key)) return false;
    const json& v = obj[key];
    if (v.is_null()) return false;
    if (v.is_boolean()) return v.get<bool>();
    if (v.is_object() || v.is_array() || v.is_string()) return !v.empty();
    return true;
}

// The checkpoint module names of the model's linears ("model.layers.3.self_attn.q_proj") and the
// short ones a target_modules entry may give ("q_proj", "qkv_proj" when fused).
struct module_ref {
    int64_t                  layer = 0;
    std::vector<linear_role> roles;
};
std::map<std::string, module_ref> model_modules(const llama_hparams& hp, std::set<std::string>* short_names) {
    std::map<std::string, module_ref> out;
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (const linear_module& m : llama_linear_modules(hp, i)) {
            out[m.module] = {i, m.roles};
            short_names->insert(m.module.substr(m.module.rfind('.') + 1));
        }
    return out;
}

result<lora_config> config_read(const std::string& path, const std::set<std::string>& short_names) {
    GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(path));
    if (!j.is_object()) return make_error(E_PARSE, "{}: expected a JSON object", path);
    const json_fields f{j, path};
    GPTQ_ASSIGN_OR_RETURN(std::string type, f.get_string_or("peft_type", "LORA"));
    if (type != "LORA")
        return make_error(E_UNSUP, "{}: peft_type {}: only LoRA adapters are supported", path,
                          json_fields::quote(j["peft_type"]));
    if (json_set(j, "use_dora"))
        return make_error(E_UNSUP, "{}: use_dora true: DoRA adapters are not supported (only plain LoRA)", path);
    GPTQ_ASSIGN_OR_RETURN(std::string bias, f.get_string_or("bias", "none"));
    if (bias != "none")
        return make_error(E_UNSUP, "{}: bias {}: trained biases are not supported (only \"none\")", path,
                          json_fields::quote(j["bias"]));
    for (const char* key : {"lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                            "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens"})
        if (json_set(j, key))
            return make_error(E_UNSUP, "{}: {} {} is not supported (docs/lora.md lists what is)", path, key,
                              json_fields::quote(j[key]));
    lora_config c;
    GPTQ_ASSIGN_OR_RETURN(c.r, f.get_int("r"));
    if (c.r < 1 || c.r > 65536) return make_error(E_ARG, "{}: r {} is out of range [1, 65536]", path, c.r);
    GPTQ_ASSIGN_OR_RETURN(c.alpha, f.get_number_or("lora_alpha", 8.0));
    if (!std::isfinite(c.alpha)) return make_error(E_ARG, "{}: lora_alpha is not finite", path);
    GPTQ_ASSIGN_OR_RETURN(c.rslora, f.get_bool_or("use_rslora", false));
    // fan_in_fan_out describes the base layer's storage (GPT-2's Conv1D); lora_A / lora_B are
    // always [r, in] / [out, r], and PEFT resets it to false on nn.Linear: nothing to do.
    // A list of targets: each must name a linear the model has (PEFT matches a module whose name
    // equals the entry or ends with "." + entry). A string is a regex over full names: the tensors
    // below say which modules it matched, and each is checked.
    if (j.contains("target_modules") && j["target_modules"].is_array()) {
        for (const json& t : j["target_modules"]) {
            if (!t.is_string()) return make_error(E_PARSE, "{}: target_modules holds {}", path, json_fields::quote(t));
            std::string s = t.get<std::string>();
            s             = s.substr(s.rfind('.') == std::string::npos ? 0 : s.rfind('.') + 1);
            if (!short_names.count(s)) {
                std::string have;
                for (const std::string& n : short_names) have += (have.empty() ? "" : ", ") + n;
                return make_error(E_UNSUP,
                                  "{}: target_modules names {}, which this model does not have as a linear "
                                  "gptq adapts (it has: {})",
                                  path, json_fields::quote(t), have);
            }
        }
    }
    return c;
}

// "base_model.model.<module>.lora_A.weight" -> module, which ("lora_A"/"lora_B"); false otherwise.
bool tensor_name_split(const std::string& name, std::string* module, std::string* which) {
    static const std::string prefix = "base_model.model.";
    if (name.rfind(prefix, 0) != 0) return false;
    for (const char* w : {".lora_A.weight", ".lora_B.weight"}) {
        const std::string suffix = w;
        if (name.size() > prefix.size() + suffix.size() &&
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            *module = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
            *which  = suffix.substr(1, 6);
            return true;
        }
    }
    return false;
}

result<std::vector<float>> tensor_read(const safetensors_file& f, const safetensors_tensor_info& t) {
    if (!dtype_is_float(t.type))
        return make_error(E_PARSE, "{}: tensor {} has dtype {}, expected a float type", f.path(), t.name,
                          dtype_name(t.type));
    std::vector<float> v(static_cast<size_t>(t.numel()));
    GPTQ_TRY(f.read_f32(t, v.data()));
    for (size_t i = 0; i < v.size(); ++i)
        if (!std::isfinite(v[i]))
            return make_error(E_ARG, "{}: tensor {} holds a non-finite value ({}) at element {}", f.path(), t.name,
                              v[i], i);
    return v;
}

}  // namespace

int64_t lora_adapter::n_modules() const {
    int64_t n = 0;
    for (const auto& l : layers)
        for (const lora_module& m : l) n += m.r > 0;
    return n;
}

uint64_t lora_adapter::bytes() const {
    uint64_t n = 0;
    for (const auto& l : layers)
        for (const lora_module& m : l) n += (m.a.size() + m.b.size()) * sizeof(float);
    return n;
}

result<lora_adapter> lora_adapter_load(const std::string& dir, const llama_hparams& hp, float user_scale) {
    namespace fs = std::filesystem;
    if (!dir_exists(dir)) return make_error(status_code::STATUS_NOT_FOUND, "LoRA adapter {}: no such folder", dir);
    if (hp.n_expert > 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "LoRA adapter {}: adapters on a mixture-of-experts model ({} experts) are not supported yet",
                          dir, hp.n_expert);
    const std::string cfg_path = path_join(dir, "adapter_config.json");
    const std::string st_path  = path_join(dir, "adapter_model.safetensors");
    if (!file_exists(st_path))
        return make_error(status_code::STATUS_NOT_FOUND, "LoRA adapter {}: no adapter_model.safetensors{}", dir,
                          file_exists(path_join(dir, "adapter_model.bin"))
                              ? " (adapter_model.bin, a pickle, is not read: save with safe_serialization=True)"
                              : "");
    if (!std::isfinite(user_scale))
        return make_error(E_ARG, "LoRA adapter {}: the scale {} is not finite", dir, user_scale);
    std::set<std::string>                   short_names;
    const std::map<std::string, module_ref> modules = model_modules(hp, &short_names);
    GPTQ_ASSIGN_OR_RETURN(lora_config cfg, config_read(cfg_path, short_names));
    GPTQ_ASSIGN_OR_RETURN(auto file, safetensors_file::open(st_path));

    lora_adapter out;
    out.path = dir;
    out.name = fs::path(dir).lexically_normal().filename().string();
    if (out.name.empty()) out.name = fs::path(dir).lexically_normal().parent_path().filename().string();
    out.layers.resize(static_cast<size_t>(hp.n_layer));
    // module -> (A, B) tensors
    std::map<std::string, std::array<const safetensors_tensor_info*, 2>> found;
    for (const safetensors_tensor_info& t : file->tensors()) {
        std::string module, which;
        if (!tensor_name_split(t.name, &module, &which)) {
            const char* why = t.name.find("lora_magnitude_vector") != std::string::npos ? " (DoRA is not supported)"
                              : t.name.find("lora_embedding") != std::string::npos
                                  ? " (embedding LoRA is not supported)"
                                  : "";
            return make_error(E_UNSUP, "{}: tensor {} is not a LoRA A or B weight of a linear{}", st_path, t.name, why);
        }
        if (!modules.count(module))
            return make_error(E_UNSUP,
                              "{}: tensor {} adapts {}, which the model does not have as a linear gptq "
                              "adapts ({} layers; q/k/v/o/gate/up/down projections)",
                              st_path, t.name, module, hp.n_layer);
        found[module][which == "lora_A" ? 0 : 1] = &t;
    }
    if (found.empty()) return make_error(E_ARG, "{}: no lora_A / lora_B tensors", st_path);
    for (const auto& [module, ab] : found) {
        if (!ab[0] || !ab[1])
            return make_error(E_ARG, "{}: module {} has {} but no {}", st_path, module, ab[0] ? "lora_A" : "lora_B",
                              ab[0] ? "lora_B" : "lora_A");
        const module_ref&          ref    = modules.at(module);
        const linear_slot          slot   = llama_linear_slot(hp, ref.layer, ref.roles[0]);
        const int64_t              n_in   = hp.linear_shape(ref.roles[0])[1];
        const std::vector<int64_t> want_a = {cfg.r, n_in}, want_b = {slot.n_out_module, cfg.r};
        if (ab[0]->shape != want_a || ab[1]->shape != want_b)
            return make_error(E_ARG,
                              "{}: module {}: lora_A is [{}] and lora_B [{}], expected [{}] and [{}] (r {} of "
                              "{} and the model's shapes)",
                              st_path, module, fmt::join(ab[0]->shape, ", "), fmt::join(ab[1]->shape, ", "),
                              fmt::join(want_a, ", "), fmt::join(want_b, ", "), cfg.r, cfg_path);
        GPTQ_ASSIGN_OR_RETURN(std::vector<float> a, tensor_read(*file, *ab[0]));
        GPTQ_ASSIGN_OR_RETURN(std::vector<float> b, tensor_read(*file, *ab[1]));
        for (linear_role role : ref.roles) {  // a fused module: each role takes its rows of B
            const linear_slot s     = llama_linear_slot(hp, ref.layer, role);
            const int64_t     n_out = hp.linear_shape(role)[0];
            lora_module&      m     = out.layers[static_cast<size_t>(ref.layer)][static_cast<size_t>(role)];
            m.r                     = cfg.r;
            m.scale                 = cfg.scale() * user_scale;
            m.a                     = a;
            m.b.assign(b.begin() + s.row0 * cfg.r, b.begin() + (s.row0 + n_out) * cfg.r);
        }
    }
    return out;
}

lora_adapter lora_adapters_stack(const std::vector<lora_adapter>& parts) {
    GPTQ_ASSERT(!parts.empty());
    lora_adapter out;
    for (const lora_adapter& p : parts) {
        out.name += (out.name.empty() ? "" : "+") + p.name;
        out.path += (out.path.empty() ? "" : ",") + p.path;
    }
    out.layers.resize(parts[0].layers.size());
    for (size_t i = 0; i < out.layers.size(); ++i)
        for (size_t r = 0; r < static_cast<size_t>(k_n_linear_roles); ++r) {
            std::vector<const lora_module*> ms;
            for (const lora_adapter& p : parts)
                if (p.layers[i][r].r > 0) ms.push_back(&p.layers[i][r]);
            if (ms.empty()) continue;
            if (ms.size() == 1) {
                out.layers[i][r] = *ms[0];
                continue;
            }
            lora_module& m     = out.layers[i][r];
            const size_t n_in  = ms[0]->a.size() / static_cast<size_t>(ms[0]->r);
            const size_t n_out = ms[0]->b.size() / static_cast<size_t>(ms[0]->r);
            for (const lora_module* p : ms) m.r += p->r;
            m.scale = 1.0f;
            m.a.reserve(static_cast<size_t>(m.r) * n_in);
            m.b.assign(static_cast<size_t>(m.r) * n_out, 0.0f);
            int64_t col0 = 0;
            for (const lora_module* p : ms) {
                m.a.insert(m.a.end(), p->a.begin(), p->a.end());
                for (size_t o = 0; o < n_out; ++o)
                    for (int64_t k = 0; k < p->r; ++k)
                        m.b[o * static_cast<size_t>(m.r) + static_cast<size_t>(col0 + k)] =
                            p->scale * p->b[o * static_cast<size_t>(p->r) + static_cast<size_t>(k)];
                col0 += p->r;
            }
        }
    return out;
}

void lora_forward(const ops_context& ctx, const lora_module& m, const float* x, float* y, int64_t n_rows, int64_t n_in,
                  int64_t n_out) {
    if (n_rows == 0) return;
    std::vector<float> t(static_cast<size_t>(n_rows * m.r));    // [n_rows, r] = x A^T
    std::vector<float> u(static_cast<size_t>(n_rows * n_out));  // [n_rows, n_out] = t B^T
    op_linear(ctx, x, m.a.data(), nullptr, t.data(), n_rows, m.r, n_in);
    op_linear(ctx, t.data(), m.b.data(), nullptr, u.data(), n_rows, n_out, m.r);
    for (size_t i = 0; i < u.size(); ++i) y[i] += m.scale * u[i];
}

void lora_merge_into(const lora_module& m, float* w, int64_t n_out, int64_t n_in) {
    for (int64_t o = 0; o < n_out; ++o) {
        const float* b   = m.b.data() + o * m.r;
        float*       row = w + o * n_in;
        for (int64_t k = 0; k < m.r; ++k) {
            const float  s = m.scale * b[k];
            const float* a = m.a.data() + k * n_in;
            for (int64_t i = 0; i < n_in; ++i) row[i] += s * a[i];
        }
    }
}

}  // namespace gptq

namespace gptq {

lora_adapter lora_adapter_init(const llama_hparams& hp, int64_t r, float scale,
                               const std::array<bool, k_n_linear_roles>& targets, uint64_t seed) {
    std::mt19937_64 rng(seed);
    lora_adapter    a;
    a.name = "finetune";
    a.layers.resize(static_cast<size_t>(hp.n_layer));
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (int ri = 0; ri < k_n_linear_roles; ++ri) {
            if (!targets[static_cast<size_t>(ri)]) continue;
            const auto [n_out, n_in] = hp.linear_shape(static_cast<linear_role>(ri));
            lora_module& m           = a.layers[static_cast<size_t>(i)][static_cast<size_t>(ri)];
            m.r                      = r;
            m.scale                  = scale;
            m.a.resize(static_cast<size_t>(r * n_in));
            // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1/sqrt(fan_in)
            const double bound = 1.0 / std::sqrt(static_cast<double>(n_in));
            for (float& x : m.a) {
                const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;  // [0, 1)
                x              = static_cast<float>((2.0 * u - 1.0) * bound);
            }
            m.b.assign(static_cast<size_t>(n_out * r), 0.0f);
        }
    return a;
}

status lora_adapter_save(const lora_adapter& a, const llama_hparams& hp, const lora_save_config& c,
                         const std::string& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return make_error(status_code::STATUS_IO_ERROR, "creating {}: {}", dir, ec.message());
    std::vector<safetensors_decl>                                  decls;
    std::vector<std::pair<std::string, const std::vector<float>*>> data;
    std::set<std::string>                                          targets;
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (int ri = 0; ri < k_n_linear_roles; ++ri) {
            const linear_role  role = static_cast<linear_role>(ri);
            const lora_module* m    = a.module(i, role);
            if (!m) continue;
            const auto [n_out, n_in] = hp.linear_shape(role);
            const std::string base   = "base_model.model." + llama_linear_name(i, role);
            decls.push_back({base + ".lora_A.weight", dtype::DTYPE_F32, {m->r, n_in}});
            decls.push_back({base + ".lora_B.weight", dtype::DTYPE_F32, {n_out, m->r}});
            data.push_back({base + ".lora_A.weight", &m->a});
            data.push_back({base + ".lora_B.weight", &m->b});
            targets.insert(linear_role_name(role));
        }
    GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path_join(dir, "adapter_model.safetensors"), decls));
    for (const auto& [name, v] : data) GPTQ_TRY(w->write(name, v->data(), v->size() * sizeof(float)));
    GPTQ_TRY(w->finish());
    nlohmann::ordered_json j;
    j["alpha_pattern"]           = nlohmann::json::object();
    j["base_model_name_or_path"] = c.base_model;
    j["bias"]                    = "none";
    j["fan_in_fan_out"]          = false;
    j["inference_mode"]          = true;
    j["init_lora_weights"]       = true;
    j["layers_pattern"]          = nullptr;
    j["layers_to_transform"]     = nullptr;
    if (c.alpha == std::floor(c.alpha) && std::abs(c.alpha) < 1e9)  // as PEFT writes an int alpha
        j["lora_alpha"] = static_cast<int64_t>(c.alpha);
    else
        j["lora_alpha"] = c.alpha;
    j["lora_dropout"]    = c.lora_dropout;
    j["modules_to_save"] = nullptr;
    j["peft_type"]       = "LORA";
    j["r"]               = c.r;
    j["rank_pattern"]    = nlohmann::json::object();
    j["revision"]        = nullptr;
    j["target_modules"]  = std::vector<std::string>(targets.begin(), targets.end());
    j["task_type"]       = "CAUSAL_LM";
    j["use_dora"]        = false;
    j["use_rslora"]      = c.use_rslora;
    return file_write_atomic(path_join(dir, "adapter_config.json"), j.dump(2) + "\n");
}

}  // namespace gptq
