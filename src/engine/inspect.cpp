// gptq inspect: summarises a checkpoint from its headers and configs; of the tensor data it reads
// only the GPTQ g_idx tensors (the group size and act-order the detector checks, io/checkpoint.h).
#include "gptq/inspect.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#include "host_memory.h"
#include "io/checkpoint.h"
#include "io/gptq_config.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "io/tensor_source.h"

namespace gptq {

namespace {

bool ends_with(const std::string& s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string human_count(int64_t n) {
    if (n >= 1'000'000'000) return fmt::format("{:.2f} B", static_cast<double>(n) / 1e9);
    if (n >= 1'000'000) return fmt::format("{:.2f} M", static_cast<double>(n) / 1e6);
    if (n >= 1'000) return fmt::format("{:.2f} K", static_cast<double>(n) / 1e3);
    return std::to_string(n);
}

std::string torch_dtype_name(const std::string& st) {
    if (st == "F16") return "float16";
    if (st == "BF16") return "bfloat16";
    if (st == "F32") return "float32";
    return st;
}

}  // namespace

namespace {

// The GPTQ part of the report, from the detector: what the tensors hold, per module.
void report_quantization(const checkpoint_info& ck, inspect_quantization* q) {
    const gptq_config& c = *ck.gptq;
    q->present           = true;
    q->source            = c.source;
    q->config_files      = ck.gptq_files;
    q->sym               = c.sym;
    q->static_groups     = c.static_groups;
    q->damp_percent      = c.damp_percent;
    q->checkpoint_format = gptq_checkpoint_format_name(c.format);
    q->lm_head           = ck.tensors.count("lm_head") > 0;
    q->n_dynamic_rules   = static_cast<int>(c.dynamic.size());
    q->bits              = c.bits;
    q->group_size        = c.group_size;
    q->desc_act          = c.desc_act;
    std::map<int, int> bits, group_sizes;
    bool               act = false, any_groups = false;
    for (const auto& [m, t] : ck.tensors) {
        q->quantized_modules.push_back(m);
        q->module_kinds[fmt::format("{}-bit g{}{}", t.bits, t.group_size, t.act_order ? " act-order" : "")] += 1;
        ++bits[t.bits];
        if (t.n_groups > 1) {
            ++group_sizes[t.group_size];
            any_groups = true;
        }
        act = act || t.act_order;
    }
    auto most = [](const std::map<int, int>& m) {
        return std::max_element(m.begin(), m.end(), [](const auto& a, const auto& b) { return a.second < b.second; })
            ->first;
    };
    if (!ck.tensors.empty()) {  // what the tensors hold, whatever the config says
        q->bits       = most(bits);
        q->group_size = any_groups ? most(group_sizes) : -1;
        q->desc_act   = act;
    }
}

}  // namespace

result<inspect_report> inspect_model(const std::string& path, const inspect_options& options) {
    inspect_report r;
    r.path = path;
    // The weights and the GPTQ settings: the detector every command uses (io/checkpoint.h).
    GPTQ_ASSIGN_OR_RETURN(checkpoint_info ck, checkpoint_detect(path));
    const bool is_dir = dir_exists(path);
    if (is_dir && !file_exists(path_join(path, "config.json")))
        return make_error(status_code::STATUS_NOT_FOUND, "{}: no config.json in the model folder", path);
    if (is_dir) {
        GPTQ_ASSIGN_OR_RETURN(model_config cfg, model_config_load(path_join(path, "config.json")));
        r.has_config              = true;
        r.architecture            = cfg.architecture;
        r.model_type              = cfg.model_type;
        r.dtype                   = cfg.dtype_name;
        r.n_layers                = cfg.num_hidden_layers;
        r.hidden_size             = cfg.hidden_size;
        r.intermediate_size       = cfg.intermediate_size;
        r.n_heads                 = cfg.num_attention_heads;
        r.n_kv_heads              = cfg.num_key_value_heads;
        r.head_dim                = cfg.head_dim;
        r.vocab_size              = cfg.vocab_size;
        r.max_position_embeddings = cfg.max_position_embeddings;
        r.rope_theta              = cfg.rope.theta;
        r.rope_type               = rope_type_name(cfg.rope.type);
        r.tie_word_embeddings     = cfg.tie_word_embeddings;
    }
    if (!options.check) GPTQ_TRY(ck.check());
    for (const auto& f : ck.findings) r.findings.push_back({checkpoint_finding_level_name(f.level), f.code, f.message});
    r.has_errors     = ck.has_errors();
    r.weights_reason = ck.weights.reason;
    if (ck.gptq) report_quantization(ck, &r.quantization);
    const tensor_source& src = *ck.source;

    std::map<std::string, int64_t> dtype_elems;
    for (const auto& name : src.names()) {
        const tensor_entry* e = src.find(name);
        const auto&         t = *e->info;
        inspect_tensor      it;
        it.name               = name;
        it.dtype              = std::string(dtype_name(t.type));
        it.shape              = t.shape;
        it.n_bytes            = t.nbytes();
        const std::string& fp = e->file->path();
        it.file               = fp.substr(fp.rfind('/') == std::string::npos ? 0 : fp.rfind('/') + 1);
        r.tensors.push_back(std::move(it));
        dtype_elems[std::string(dtype_name(t.type))] += t.numel();

        // Logical parameters: a GPTQ linear counts in_features x out_features; its scales, zeros and
        // g_idx are quantization metadata, not parameters.
        if (ends_with(name, ".qweight")) {
            const auto m = ck.tensors.find(name.substr(0, name.size() - 8));
            if (m != ck.tensors.end()) r.n_params += m->second.n_in * m->second.n_out;
        } else if (ends_with(name, ".qzeros") || ends_with(name, ".scales") || ends_with(name, ".g_idx")) {
            continue;
        } else {
            r.n_params += t.numel();
        }
    }
    r.params_by_dtype = dtype_elems;
    r.bytes_on_disk   = src.total_bytes();
    r.n_files         = static_cast<int>(src.n_files());
    r.n_tensors       = static_cast<int64_t>(src.names().size());
    if (r.dtype.empty() && !dtype_elems.empty()) {
        auto best = std::max_element(dtype_elems.begin(), dtype_elems.end(),
                                     [](const auto& a, const auto& b) { return a.second < b.second; });
        r.dtype   = torch_dtype_name(best->first);
    }
    return r;
}

std::string inspect_findings_text(const inspect_report& r) {
    std::string s;
    int         n_err = 0, n_warn = 0;
    for (const auto& f : r.findings) {
        s += fmt::format("{}: {}\n", f.level, f.message);
        (f.level == "error" ? n_err : n_warn) += 1;
    }
    s += fmt::format("{}: {} error{}, {} warning{}\n", r.path, n_err, n_err == 1 ? "" : "s", n_warn,
                     n_warn == 1 ? "" : "s");
    return s;
}

std::string inspect_findings_json(const inspect_report& r) {
    json j;
    j["path"]     = r.path;
    j["findings"] = json::array();
    int n_err = 0, n_warn = 0;
    for (const auto& f : r.findings) {
        j["findings"].push_back({{"level", f.level}, {"code", f.code}, {"message", f.message}});
        (f.level == "error" ? n_err : n_warn) += 1;
    }
    j["n_errors"]   = n_err;
    j["n_warnings"] = n_warn;
    return j.dump(2);
}

std::string inspect_report_json(const inspect_report& r, bool with_tensors) {
    json j;
    j["path"]                    = r.path;
    j["architecture"]            = r.has_config ? json(r.architecture) : json(nullptr);
    j["model_type"]              = r.has_config ? json(r.model_type) : json(nullptr);
    j["dtype"]                   = r.dtype;
    j["n_params"]                = r.n_params;
    j["n_layers"]                = r.n_layers;
    j["hidden_size"]             = r.hidden_size;
    j["intermediate_size"]       = r.intermediate_size;
    j["n_heads"]                 = r.n_heads;
    j["n_kv_heads"]              = r.n_kv_heads;
    j["head_dim"]                = r.head_dim;
    j["vocab_size"]              = r.vocab_size;
    j["max_position_embeddings"] = r.max_position_embeddings;
    j["rope_theta"]              = r.rope_theta;
    j["rope_type"]               = r.rope_type;
    j["tie_word_embeddings"]     = r.tie_word_embeddings;
    j["params_by_dtype"]         = r.params_by_dtype;
    j["bytes_on_disk"]           = r.bytes_on_disk;
    j["n_files"]                 = r.n_files;
    j["n_tensors"]               = r.n_tensors;
    j["weights"]                 = r.weights_reason;
    j["findings"]                = json::array();
    for (const auto& f : r.findings)
        j["findings"].push_back({{"level", f.level}, {"code", f.code}, {"message", f.message}});
    if (r.quantization.present) {
        const auto& q     = r.quantization;
        j["quantization"] = {{"source", q.source},
                             {"bits", q.bits},
                             {"group_size", q.group_size},
                             {"desc_act", q.desc_act},
                             {"sym", q.sym},
                             {"static_groups", q.static_groups},
                             {"damp_percent", q.damp_percent},
                             {"checkpoint_format", q.checkpoint_format},
                             {"config_files", q.config_files},
                             {"lm_head", q.lm_head},
                             {"n_dynamic_rules", q.n_dynamic_rules},
                             {"module_kinds", q.module_kinds},
                             {"quantized_modules", q.quantized_modules}};
    } else {
        j["quantization"] = nullptr;
    }
    if (with_tensors) {
        json ts = json::array();
        for (const auto& t : r.tensors)
            ts.push_back(
                {{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"bytes", t.n_bytes}, {"file", t.file}});
        j["tensors"] = ts;
    }
    return j.dump(2);
}

std::string inspect_report_text(const inspect_report& r, bool with_tensors) {
    std::string s;
    auto        row = [&](const char* k, const std::string& v) { s += fmt::format("{:<18} {}\n", k, v); };
    row("path", r.path);
    if (r.has_config) {
        row("architecture", fmt::format("{} ({})", r.architecture, r.model_type));
        row("layers", std::to_string(r.n_layers));
        row("hidden size", std::to_string(r.hidden_size));
        row("intermediate size", std::to_string(r.intermediate_size));
        row("attention heads", fmt::format("{} ({} key/value, head dim {})", r.n_heads, r.n_kv_heads, r.head_dim));
        row("vocabulary", std::to_string(r.vocab_size));
        row("context", std::to_string(r.max_position_embeddings));
        row("rope", fmt::format("{} theta {}", r.rope_type, r.rope_theta));
        row("tied embeddings", r.tie_word_embeddings ? "yes" : "no");
    } else {
        row("architecture", "(no config.json: a bare .safetensors file)");
    }
    row("parameters", fmt::format("{} ({})", human_count(r.n_params), r.n_params));
    row("dtype", r.dtype);
    std::string by;
    for (const auto& [d, n] : r.params_by_dtype)
        by += fmt::format("{}{} {}", by.empty() ? "" : ", ", d, human_count(n));
    row("stored elements", by);
    row("on disk", fmt::format("{} in {} file{}, {} tensors ({})", human_bytes(r.bytes_on_disk), r.n_files,
                               r.n_files == 1 ? "" : "s", r.n_tensors, r.weights_reason));
    if (r.quantization.present) {
        const auto& q = r.quantization;
        row("quantization",
            fmt::format("GPTQ {}-bit, group size {}, desc_act {}, sym {}, format {}{}", q.bits, q.group_size,
                        q.desc_act, q.sym, q.checkpoint_format, q.lm_head ? ", lm_head quantized" : ""));
        std::string kinds;
        for (const auto& [k, n] : q.module_kinds) kinds += fmt::format("{}{} {}", kinds.empty() ? "" : ", ", n, k);
        row("quantized modules",
            fmt::format("{} ({}; config: {}{})", q.quantized_modules.size(), kinds, q.source,
                        q.n_dynamic_rules ? fmt::format(", {} dynamic rules", q.n_dynamic_rules) : std::string()));
    } else {
        row("quantization", "none");
    }
    for (const auto& f : r.findings) row(f.level.c_str(), f.message);
    if (with_tensors) {
        s += fmt::format("\n{:<60} {:<6} {:<18} {:>12}  {}\n", "tensor", "dtype", "shape", "bytes", "file");
        for (const auto& t : r.tensors) {
            std::string shape = "[";
            for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
            shape += "]";
            s += fmt::format("{:<60} {:<6} {:<18} {:>12}  {}\n", t.name, t.dtype, shape, t.n_bytes, t.file);
        }
    }
    return s;
}

}  // namespace gptq
