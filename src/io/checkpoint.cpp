// The checkpoint detector (checkpoint.h; docs/io.md "The checkpoint detector").
#include "io/checkpoint.h"

#include <dirent.h>

#include <algorithm>
#include <functional>

#include "core/error.h"
#include "core/log.h"
#include "io/json_file.h"

namespace gptq {

namespace {

constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;

bool ends_with(const std::string& s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<std::string> list_files_ending(const std::string& folder, std::string_view suffix) {
    std::vector<std::string> out;
    if (DIR* d = opendir(folder.c_str())) {
        while (dirent* e = readdir(d)) {
            std::string name = e->d_name;
            if (ends_with(name, suffix)) out.push_back(name);
        }
        closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::string name_list(const std::vector<std::string>& names, size_t max_shown = 5) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < max_shown; ++i) s += (i ? ", " : "") + names[i];
    if (names.size() > max_shown) s += fmt::format(" and {} more", names.size() - max_shown);
    return s;
}

// model_file_base_name of the first GPTQ config file that names one, read leniently (a file that
// does not parse is reported by the detector's full read, not here).
std::pair<std::string, std::string> base_name_of(const std::string& folder) {
    const std::pair<const char*, const char*> files[] = {
        {"quantize_config.json", nullptr}, {"quant_config.json", nullptr}, {"config.json", "quantization_config"}};
    for (const auto& [name, key] : files) {
        const std::string path = path_join(folder, name);
        if (!file_exists(path)) continue;
        auto j = json_read_file(path);
        if (!j || !j->is_object()) continue;
        const json* obj = &*j;
        if (key) {
            if (!j->contains(key) || !j->at(key).is_object()) continue;
            obj = &j->at(key);
        }
        auto it = obj->find("model_file_base_name");
        if (it != obj->end() && it->is_string() && !it->get<std::string>().empty())
            return {it->get<std::string>(), key ? std::string(name) + " " + key : std::string(name)};
    }
    return {};
}

}  // namespace

const char* checkpoint_finding_level_name(checkpoint_finding_level l) {
    return l == checkpoint_finding_level::FINDING_ERROR ? "error" : "warning";
}

// ---- weights ------------------------------------------------------------------------------------

result<checkpoint_weights> checkpoint_weights_locate(const std::string& path) {
    checkpoint_weights w;
    w.path = path;
    if (file_exists(path)) {
        w.folder = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
        w.file   = path;
        w.reason = "the file given";
        return w;
    }
    if (!dir_exists(path)) return make_error(status_code::STATUS_NOT_FOUND, "{}: no such file or folder", path);
    GPTQ_TRY(work_folder_check(path));
    w.folder = path;

    const auto [base, base_source] = base_name_of(path);
    if (!base.empty()) {
        if (base.find('/') != std::string::npos || base == "." || base == "..")
            return make_error(E_PARSE, "{}: model_file_base_name '{}' is not a file name in the folder",
                              path_join(path, base_source.substr(0, base_source.find(' '))), base);
        if (file_exists(path_join(path, base + ".safetensors"))) {
            w.file   = path_join(path, base + ".safetensors");
            w.reason = fmt::format("model_file_base_name '{}' of {}", base, base_source);
        } else if (file_exists(path_join(path, base + ".safetensors.index.json"))) {
            w.index  = path_join(path, base + ".safetensors.index.json");
            w.reason = fmt::format("model_file_base_name '{}' of {}", base, base_source);
        }
    }
    if (w.file.empty() && w.index.empty()) {
        const auto all = list_files_ending(path, ".safetensors");
        if (file_exists(path_join(path, "model.safetensors.index.json"))) {
            w.index  = path_join(path, "model.safetensors.index.json");
            w.reason = "model.safetensors.index.json";
        } else if (file_exists(path_join(path, "model.safetensors"))) {
            w.file   = path_join(path, "model.safetensors");
            w.reason = "model.safetensors";
        } else if (all.size() == 1) {
            w.file   = path_join(path, all[0]);
            w.reason = "the folder's only .safetensors file";
        } else if (all.empty()) {
            const auto bins = list_files_ending(path, ".bin");
            if (!bins.empty())
                return make_error(status_code::STATUS_UNSUPPORTED,
                                  "{}: the weights are PyTorch pickle files ({}); only .safetensors is read (convert "
                                  "them with transformers' save_pretrained(safe_serialization=True))",
                                  path, name_list(bins));
            return make_error(status_code::STATUS_NOT_FOUND,
                              "{}: no model.safetensors.index.json, model.safetensors or *.safetensors file{}", path,
                              base.empty() ? "" : fmt::format(" (nor {}.safetensors named by {})", base, base_source));
        } else {
            return make_error(E_PARSE,
                              "{}: {} .safetensors files ({}) and no model.safetensors.index.json or "
                              "model_file_base_name to say which to read",
                              path, all.size(), name_list(all));
        }
        if (!base.empty())
            w.findings.push_back({checkpoint_finding_level::FINDING_WARNING, "base_name_missing",
                                  fmt::format("{}: model_file_base_name '{}' of {} names no file; read {} instead",
                                              path, base, base_source, w.reason)});
    }
    // Other .safetensors files are not part of the model: say so (a stale or foreign file).
    if (!w.file.empty()) {
        std::vector<std::string> other;
        for (const auto& f : list_files_ending(path, ".safetensors"))
            if (path_join(path, f) != w.file) other.push_back(f);
        if (!other.empty())
            w.findings.push_back({checkpoint_finding_level::FINDING_WARNING, "weights_file_ignored",
                                  fmt::format("{}: read {} ({}); not read: {}", path,
                                              w.file.substr(w.file.rfind('/') + 1), w.reason, name_list(other))});
    }
    return w;
}

// ---- what the tensors say -----------------------------------------------------------------------

result<gptq_module_tensors> gptq_module_tensors_read(const tensor_source& src, const std::string& module) {
    gptq_module_tensors t;
    t.module = module;
    auto get = [&](const char* suffix, bool int32, size_t ndim) -> result<tensor_entry> {
        const std::string name = module + suffix;
        GPTQ_ASSIGN_OR_RETURN(tensor_entry e, src.get(name));
        if (int32 && e.info->type != dtype::DTYPE_I32)
            return make_error(E_PARSE, "{}: tensor '{}' has dtype {}, expected I32", e.file->path(), name,
                              dtype_name(e.info->type));
        if (e.info->shape.size() != ndim)
            return make_error(E_PARSE, "{}: tensor '{}' has {} dimensions, expected {}", e.file->path(), name,
                              e.info->shape.size(), ndim);
        for (int64_t d : e.info->shape)
            if (d <= 0) return make_error(E_PARSE, "{}: tensor '{}' has an empty dimension", e.file->path(), name);
        return e;
    };
    GPTQ_ASSIGN_OR_RETURN(tensor_entry qw, get(".qweight", true, 2));
    GPTQ_ASSIGN_OR_RETURN(tensor_entry qz, get(".qzeros", true, 2));
    GPTQ_ASSIGN_OR_RETURN(tensor_entry sc, get(".scales", false, 2));
    GPTQ_ASSIGN_OR_RETURN(tensor_entry gi, get(".g_idx", true, 1));
    const std::string& file = qw.file->path();
    t.file                  = file;
    t.n_out                 = qw.info->shape[1];
    t.n_groups              = sc.info->shape[0];
    t.n_in                  = gi.info->shape[0];
    const int64_t rows = qw.info->shape[0], z_rows = qz.info->shape[0], z_cols = qz.info->shape[1];
    if (sc.info->shape[1] != t.n_out)
        return make_error(E_PARSE, "{}: {}.scales has {} columns but {}.qweight has {} (output features)",
                          sc.file->path(), module, sc.info->shape[1], module, t.n_out);
    if (z_rows != t.n_groups)
        return make_error(E_PARSE, "{}: {}.qzeros has {} rows but {}.scales has {} (groups)", qz.file->path(), module,
                          z_rows, module, t.n_groups);
    // Bits from the zeros: N outputs packed into z_cols 32-bit words (format.md 1.3).
    if ((32 * z_cols) % t.n_out != 0 || !(32 * z_cols / t.n_out == 2 || 32 * z_cols / t.n_out == 3 ||
                                          32 * z_cols / t.n_out == 4 || 32 * z_cols / t.n_out == 8))
        return make_error(E_PARSE,
                          "{}: {}.qzeros has {} columns for {} output features: 32 x {} / {} is not 2, 3, 4 or 8 bits",
                          qz.file->path(), module, z_cols, t.n_out, z_cols, t.n_out);
    t.bits = static_cast<int>(32 * z_cols / t.n_out);
    if (rows * 32 != t.n_in * t.bits)
        return make_error(E_PARSE,
                          "{}: {}.qweight has {} rows but {}.g_idx has {} entries: {}-bit codes (from qzeros) of {} "
                          "inputs take {} x {} / 32 rows",
                          file, module, rows, module, t.n_in, t.bits, t.n_in, t.n_in, t.bits);

    // Group size and act-order from g_idx: GPTQ gives each group the same number of columns
    // (the last one fewer), in input order without act-order and permuted with it.
    std::vector<int32_t> g(static_cast<size_t>(t.n_in));
    gi.file->copy_to(*gi.info, g.data());
    std::vector<int64_t> count(static_cast<size_t>(t.n_groups), 0);
    for (int64_t k = 0; k < t.n_in; ++k) {
        const int32_t v = g[static_cast<size_t>(k)];
        if (v < 0 || v >= t.n_groups)
            return make_error(E_PARSE, "{}: {}.g_idx[{}] = {} is outside the {} groups of its scales", gi.file->path(),
                              module, k, v, t.n_groups);
        ++count[static_cast<size_t>(v)];
    }
    if (t.n_groups == 1) {
        t.group_size = -1;
        return t;
    }
    const int64_t gs = count[0];
    bool          ok = gs > 0 && (t.n_in + gs - 1) / gs == t.n_groups;
    for (int64_t i = 0; ok && i < t.n_groups; ++i) ok = count[static_cast<size_t>(i)] == std::min(gs, t.n_in - i * gs);
    if (!ok) {
        int64_t bad = 0;
        while (bad + 1 < t.n_groups && count[static_cast<size_t>(bad)] == gs) ++bad;
        return make_error(E_PARSE,
                          "{}: {}.g_idx does not split its {} inputs into {} groups of one size: group 0 has {} "
                          "columns, group {} has {}",
                          gi.file->path(), module, t.n_in, t.n_groups, gs, bad, count[static_cast<size_t>(bad)]);
    }
    t.group_size = static_cast<int>(gs);
    for (int64_t k = 0; k < t.n_in && !t.act_order; ++k) t.act_order = g[static_cast<size_t>(k)] != k / gs;
    return t;
}

bool gptq_group_size_fits(int group_size, const gptq_module_tensors& t) {
    const int64_t expected_groups = group_size == -1 ? 1 : (t.n_in + group_size - 1) / group_size;
    if (expected_groups != t.n_groups) return false;
    return t.n_groups == 1 || group_size == t.group_size;
}

// ---- config files -------------------------------------------------------------------------------

result<std::vector<gptq_config_file>> gptq_config_files_read(const std::string& folder) {
    std::vector<gptq_config_file>             out;
    const std::pair<const char*, const char*> files[] = {
        {"quantize_config.json", nullptr}, {"quant_config.json", nullptr}, {"config.json", "quantization_config"}};
    for (const auto& [name, key] : files) {
        auto c = gptq_config_read(path_join(folder, name), key);
        if (!c) {
            if (c.error().code() == status_code::STATUS_NOT_FOUND) continue;
            return c.error();
        }
        out.push_back({key ? std::string(name) + " " + key : std::string(name), std::move(c).value()});
    }
    return out;
}

// ---- the detector -------------------------------------------------------------------------------

namespace {

std::string group_size_str(int gs) {
    return gs == -1 ? "-1 (one group per row)" : std::to_string(gs);
}

// The modules a field of the base config governs: those no `dynamic` rule overrides it for.
bool base_governs(const gptq_config& base, const std::string& module, const char* field) {
    const gptq_dynamic_rule* r = base.dynamic_rule_for(module);
    if (!r) return true;
    if (r->skip) return false;
    if (std::string_view(field) == "bits") return !r->bits;
    if (std::string_view(field) == "group_size") return !r->group_size;
    if (std::string_view(field) == "desc_act") return !r->desc_act;
    return !r->sym;
}

// Config files that disagree: a warning naming both files and values; the value the tensors
// confirm wins (bits, group_size, desc_act), else the first file's.
void resolve_disagreements(const std::vector<gptq_config_file>& files, const checkpoint_info& info, gptq_config* base,
                           std::vector<checkpoint_finding>* findings) {
    struct field {
        const char*                                                         name;
        std::function<std::string(const gptq_config&)>                      show;
        std::function<bool(const gptq_config&, const gptq_module_tensors&)> fits;  // null: tensors cannot tell
        std::function<void(gptq_config*, const gptq_config&)>               take;
    };
    const field fields[] = {
        {"bits", [](const gptq_config& c) { return std::to_string(c.bits); },
         [](const gptq_config& c, const gptq_module_tensors& t) { return c.bits == t.bits; },
         [](gptq_config* b, const gptq_config& c) { b->bits = c.bits; }},
        {"group_size", [](const gptq_config& c) { return std::to_string(c.group_size); },
         [](const gptq_config& c, const gptq_module_tensors& t) { return gptq_group_size_fits(c.group_size, t); },
         [](gptq_config* b, const gptq_config& c) { b->group_size = c.group_size; }},
        {"desc_act", [](const gptq_config& c) { return c.desc_act ? "true" : "false"; },
         [](const gptq_config& c, const gptq_module_tensors& t) { return c.desc_act || !t.act_order; },
         [](gptq_config* b, const gptq_config& c) { b->desc_act = c.desc_act; }},
        {"sym", [](const gptq_config& c) { return c.sym ? "true" : "false"; }, nullptr,
         [](gptq_config* b, const gptq_config& c) { b->sym = c.sym; }},
        {"checkpoint_format", [](const gptq_config& c) { return std::string(gptq_checkpoint_format_name(c.format)); },
         nullptr, [](gptq_config* b, const gptq_config& c) { b->format = c.format; }},
        {"lm_head", [](const gptq_config& c) { return c.lm_head ? "true" : "false"; }, nullptr,
         [](gptq_config* b, const gptq_config& c) { b->lm_head = c.lm_head; }},
    };
    const bool lm_head_tensors = info.source && info.source->has("lm_head.qweight");
    for (const auto& f : fields) {
        std::vector<size_t> distinct;  // first file of each distinct value
        for (size_t i = 0; i < files.size(); ++i) {
            bool seen = false;
            for (size_t d : distinct) seen = seen || f.show(files[d].config) == f.show(files[i].config);
            if (!seen) distinct.push_back(i);
        }
        if (distinct.size() < 2) continue;
        // The first value (in precedence order) that every module the base governs confirms.
        size_t      chosen  = distinct[0];
        std::string why     = fmt::format("{} is read first", files[distinct[0]].label);
        bool        decided = false;
        for (size_t d : distinct) {
            const gptq_config& c        = files[d].config;
            bool               fits_all = true, any = false;
            if (std::string_view(f.name) == "lm_head") {
                any      = info.source != nullptr;
                fits_all = c.lm_head == lm_head_tensors;
            } else if (f.fits) {
                for (const auto& [m, t] : info.tensors) {
                    if (m == "lm_head" || !base_governs(c, m, f.name)) continue;
                    any      = true;
                    fits_all = fits_all && f.fits(c, t);
                }
            }
            if (any && fits_all) {
                chosen  = d;
                why     = "the tensors agree with it";
                decided = true;
                break;
            }
        }
        if (!decided && (f.fits || std::string_view(f.name) == "lm_head") && info.source)
            why = fmt::format("the tensors agree with neither; {} is read first", files[distinct[0]].label);
        if (!f.fits && std::string_view(f.name) == "checkpoint_format")
            why += "; the zeros themselves are checked when the weights are read";
        f.take(base, files[chosen].config);
        std::string values;
        for (size_t d : distinct)
            values += fmt::format("{}{} says {} {}", values.empty() ? "" : ", ", files[d].label, f.name,
                                  f.show(files[d].config));
        findings->push_back({checkpoint_finding_level::FINDING_WARNING, "config_files_disagree",
                             fmt::format("{}: the GPTQ config files disagree: {}; using {} {} ({})",
                                         info.weights.folder, values, f.name, f.show(files[chosen].config), why)});
    }
    for (size_t i = 1; i < files.size(); ++i) {
        std::vector<std::string> a, b;
        for (const auto& r : files[0].config.dynamic) a.push_back(r.key);
        for (const auto& r : files[i].config.dynamic) b.push_back(r.key);
        const json none;
        const auto dyn = [&](const gptq_config& c) -> const json& {
            return c.raw.is_object() && c.raw.contains("dynamic") ? c.raw.at("dynamic") : none;
        };
        if (a != b || dyn(files[0].config) != dyn(files[i].config))
            findings->push_back(
                {checkpoint_finding_level::FINDING_WARNING, "config_files_disagree",
                 fmt::format("{}: the GPTQ config files disagree on `dynamic` ({} has {} rules, {} has "
                             "{}); using {}'s",
                             info.weights.folder, files[0].label, a.size(), files[i].label, b.size(), files[0].label)});
    }
}

// Each module's settings against its tensors. Disagreements of the same kind (same config value,
// same tensor value) are one finding listing the modules, so a wrong base config is one line:
// "<file>: <module or N modules (...)>: <config file> says <field> <value>, but the tensors ...".
void check_modules(const gptq_config& base, checkpoint_info* info) {
    struct issue {
        std::string              file;  // of the first module
        std::vector<std::string> modules;
    };
    std::map<std::string, issue> issues;  // keyed by the text after the module list
    auto                         add = [&](const gptq_module_tensors& t, const std::string& text) {
        auto& i = issues[text];
        if (i.modules.empty()) i.file = t.file;
        i.modules.push_back(t.module);
    };
    for (const auto& [m, t] : info->tensors) {
        std::optional<gptq_config> c = base.for_module(m);
        if (!c) {
            add(t, fmt::format("{} leaves it unquantized (dynamic '{}') but its tensors are GPTQ (.qweight)",
                               base.source, base.dynamic_rule_for(m)->key));
            continue;
        }
        if (m == "lm_head" && !base.lm_head)
            add(t, fmt::format("{} says lm_head false, but the checkpoint holds a quantized lm_head (lm_head.qweight)",
                               base.source));
        if (c->bits != t.bits)
            add(t, fmt::format("{} says bits {}, but the tensors hold {}-bit codes (from the width of qzeros)",
                               c->source, c->bits, t.bits));
        if (!gptq_group_size_fits(c->group_size, t))
            add(t, fmt::format("{} says group_size {}, but the tensors have {} group{} over {} inputs (group size {})",
                               c->source, group_size_str(c->group_size), t.n_groups, t.n_groups == 1 ? "" : "s", t.n_in,
                               group_size_str(t.group_size)));
        if (!c->desc_act && t.act_order)
            add(t, fmt::format("{} says desc_act false, but g_idx is in act-order (not k // {})", c->source,
                               t.group_size));
        info->modules[m] = std::move(*c);
    }
    for (const auto& [text, i] : issues) {
        const std::string who = i.modules.size() == 1
                                    ? i.modules[0]
                                    : fmt::format("{} modules ({})", i.modules.size(), name_list(i.modules, 3));
        info->findings.push_back({checkpoint_finding_level::FINDING_ERROR, "config_vs_tensors",
                                  fmt::format("{}: {}: {}", i.file, who, text)});
    }
    if (base.lm_head && info->source && !info->source->has("lm_head.qweight"))
        info->findings.push_back({checkpoint_finding_level::FINDING_ERROR, "config_vs_tensors",
                                  fmt::format("{}: {} says lm_head true, but the checkpoint has no lm_head.qweight",
                                              info->weights.path, base.source)});
}

}  // namespace

result<checkpoint_info> checkpoint_detect(const std::string& path, const checkpoint_detect_options& options) {
    checkpoint_info info;
    auto            located = checkpoint_weights_locate(path);
    if (located) {
        info.weights = std::move(located).value();
        GPTQ_ASSIGN_OR_RETURN(info.source, tensor_source::open(path));
    } else if (!options.need_weights && located.error().code() == status_code::STATUS_NOT_FOUND && dir_exists(path)) {
        info.weights.path   = path;
        info.weights.folder = path;
    } else {
        return located.error();
    }
    info.findings = info.weights.findings;

    GPTQ_ASSIGN_OR_RETURN(std::vector<gptq_config_file> files, gptq_config_files_read(info.weights.folder));
    for (const auto& f : files) info.gptq_files.push_back(f.label);

    // Quantized modules: every <module>.qweight, read for what its tensors say.
    std::vector<std::string> quantized;
    if (info.source)
        for (const auto& name : info.source->names())
            if (ends_with(name, ".qweight")) quantized.push_back(name.substr(0, name.size() - 8));
    if (files.empty()) {
        if (!quantized.empty())
            return make_error(E_PARSE,
                              "{}: holds GPTQ tensors ({}.qweight, ...) but no quantization config was found "
                              "(quantize_config.json, quant_config.json or config.json quantization_config)",
                              path, quantized.front());
        return info;
    }
    for (const auto& m : quantized) {
        GPTQ_ASSIGN_OR_RETURN(gptq_module_tensors t, gptq_module_tensors_read(*info.source, m));
        info.tensors[m] = std::move(t);
    }
    gptq_config base = files[0].config;
    base.source      = path_join(info.weights.folder, files[0].label);
    resolve_disagreements(files, info, &base, &info.findings);
    if (info.source) {
        if (quantized.empty())
            info.findings.push_back({checkpoint_finding_level::FINDING_ERROR, "no_quantized_tensors",
                                     fmt::format("{}: {} describes a GPTQ checkpoint but no tensor is quantized (no "
                                                 "<module>.qweight in {})",
                                                 info.weights.folder, base.source, info.weights.reason)});
        check_modules(base, &info);
    }
    info.gptq = std::move(base);
    return info;
}

bool checkpoint_info::has_errors() const {
    return std::any_of(findings.begin(), findings.end(),
                       [](const auto& f) { return f.level == checkpoint_finding_level::FINDING_ERROR; });
}

status checkpoint_info::check() const {
    size_t                    n_errors = 0;
    const checkpoint_finding* first    = nullptr;
    for (const auto& f : findings)
        if (f.level == checkpoint_finding_level::FINDING_ERROR) {
            if (!first) first = &f;
            ++n_errors;
        }
    if (!first) return status::ok();
    if (n_errors == 1) return make_error(E_PARSE, "{}", first->message);
    return make_error(E_PARSE, "{} ({} more problem{}: `gptq inspect --check {}` lists them)", first->message,
                      n_errors - 1, n_errors == 2 ? "" : "s", weights.path);
}

void checkpoint_info::log_warnings() const {
    for (const auto& f : findings)
        if (f.level == checkpoint_finding_level::FINDING_WARNING) GPTQ_LOG_WARN("{}", f.message);
}

const gptq_config* checkpoint_info::module_config(std::string_view module) const {
    auto it = modules.find(module);
    return it == modules.end() ? nullptr : &it->second;
}

}  // namespace gptq
