#include "io/gptq_config.h"

#include "core/error.h"
#include "core/log.h"

namespace gptq {

namespace {
constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;
constexpr auto E_UNSUP = status_code::STATUS_UNSUPPORTED;
}  // namespace

const char* gptq_checkpoint_format_name(gptq_checkpoint_format f) {
    switch (f) {
        case gptq_checkpoint_format::GPTQ_FORMAT_V1:
            return "gptq";
        case gptq_checkpoint_format::GPTQ_FORMAT_V2:
            return "gptq_v2";
        case gptq_checkpoint_format::GPTQ_FORMAT_MARLIN:
            return "marlin";
    }
    return "?";
}

result<gptq_config> gptq_config_parse(const json& j, const std::string& where) {
    if (!j.is_object())
        return make_error(E_PARSE, "{}: quantization config is {}, expected an object", where, json_fields::quote(j));
    json_fields f{j, where};
    gptq_config c;
    c.source = where;
    c.raw    = j;

    GPTQ_ASSIGN_OR_RETURN(c.quant_method, f.get_string_or("quant_method", f.has("method") ? "" : "gptq"));
    if (c.quant_method.empty()) {
        GPTQ_ASSIGN_OR_RETURN(c.quant_method, f.get_string("method"));
    }
    if (c.quant_method != "gptq")
        return make_error(E_UNSUP, "{}: quant_method '{}' is not supported (only gptq)", where, c.quant_method);

    int64_t bits = 0;
    if (f.has("bits")) {
        GPTQ_ASSIGN_OR_RETURN(bits, f.get_int("bits"));
    } else {
        GPTQ_ASSIGN_OR_RETURN(bits, f.get_int("w_bit"));
    }
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return make_error(E_UNSUP, "{}: bits {} is not supported (2, 3, 4 or 8)", where, bits);
    c.bits = static_cast<int>(bits);

    int64_t gs = 128;
    if (f.has("group_size")) {
        GPTQ_ASSIGN_OR_RETURN(gs, f.get_int("group_size"));
    } else if (f.has("q_group_size")) {
        GPTQ_ASSIGN_OR_RETURN(gs, f.get_int("q_group_size"));
    } else {
        return make_error(E_PARSE, "{}: missing required key 'group_size'", where);
    }
    if (gs != -1 && (gs <= 0 || gs > (int64_t(1) << 24)))
        return make_error(E_PARSE, "{}: group_size {} must be -1 or a positive integer", where, gs);
    c.group_size = static_cast<int>(gs);

    GPTQ_ASSIGN_OR_RETURN(c.desc_act, f.get_bool_or("desc_act", false));
    if (!f.has("sym")) GPTQ_LOG_WARN("{}: no 'sym' key; assuming sym=true as AutoGPTQ does", where);
    GPTQ_ASSIGN_OR_RETURN(c.sym, f.get_bool_or("sym", true));
    GPTQ_ASSIGN_OR_RETURN(c.lm_head, f.get_bool_or("lm_head", false));

    // AutoGPTQ keeps damp_percent / static_groups / true_sequential at the top; GPTQModel in "meta".
    const json* meta = f.has("meta") && j.at("meta").is_object() ? &j.at("meta") : nullptr;
    json_fields mf{meta ? *meta : j, where + " meta"};
    auto        pick_number = [&](const char* key, double def) -> result<double> {
        if (f.has(key)) return f.get_number(key);
        if (meta && mf.has(key)) return mf.get_number(key);
        return def;
    };
    auto pick_bool = [&](const char* key, bool def) -> result<bool> {
        if (f.has(key)) return f.get_bool_or(key, def);
        if (meta && mf.has(key)) return mf.get_bool_or(key, def);
        return def;
    };
    GPTQ_ASSIGN_OR_RETURN(c.damp_percent, pick_number("damp_percent", 0.01));
    if (!(c.damp_percent > 0.0 && c.damp_percent < 1.0))
        return make_error(E_PARSE, "{}: damp_percent {} must be in (0, 1)", where, c.damp_percent);
    GPTQ_ASSIGN_OR_RETURN(c.static_groups, pick_bool("static_groups", false));
    GPTQ_ASSIGN_OR_RETURN(c.true_sequential, pick_bool("true_sequential", true));
    if (meta && meta->contains("quantizer")) {
        const auto& q = meta->at("quantizer");
        if (q.is_string()) c.quantizer.push_back(q.get<std::string>());
        if (q.is_array())
            for (const auto& s : q)
                if (s.is_string()) c.quantizer.push_back(s.get<std::string>());
    }

    std::string fmt_name = "gptq";
    if (f.has("checkpoint_format")) {
        GPTQ_ASSIGN_OR_RETURN(fmt_name, f.get_string("checkpoint_format"));
    } else if (f.has("format")) {
        GPTQ_ASSIGN_OR_RETURN(fmt_name, f.get_string("format"));
    }
    GPTQ_ASSIGN_OR_RETURN(bool is_marlin, f.get_bool_or("is_marlin_format", false));
    if (is_marlin) fmt_name = "marlin";
    if (fmt_name == "gptq") {
        c.format = gptq_checkpoint_format::GPTQ_FORMAT_V1;
    } else if (fmt_name == "gptq_v2") {
        c.format = gptq_checkpoint_format::GPTQ_FORMAT_V2;
    } else if (fmt_name == "marlin") {
        c.format = gptq_checkpoint_format::GPTQ_FORMAT_MARLIN;
    } else {
        return make_error(E_UNSUP, "{}: checkpoint_format '{}' is not supported (gptq, gptq_v2, marlin)", where,
                          fmt_name);
    }
    GPTQ_ASSIGN_OR_RETURN(c.pack_dtype, f.get_string_or("pack_dtype", "int32"));
    if (c.pack_dtype != "int32")
        return make_error(E_UNSUP, "{}: pack_dtype '{}' is not supported (only int32)", where, c.pack_dtype);
    GPTQ_ASSIGN_OR_RETURN(c.model_file_base_name, f.get_string_or("model_file_base_name", ""));
    return c;
}

json gptq_config::to_json() const {
    json j;
    j["bits"]                 = bits;
    j["group_size"]           = group_size;
    j["desc_act"]             = desc_act;
    j["sym"]                  = sym;
    j["damp_percent"]         = damp_percent;
    j["static_groups"]        = static_groups;
    j["true_sequential"]      = true_sequential;
    j["quant_method"]         = "gptq";
    j["checkpoint_format"]    = gptq_checkpoint_format_name(format);
    j["model_name_or_path"]   = nullptr;
    j["model_file_base_name"] = model_file_base_name.empty() ? json(nullptr) : json(model_file_base_name);
    j["lm_head"]              = lm_head;
    j["pack_dtype"]           = "int32";
    j["meta"]                 = {{"quantizer", quantizer}};
    return j;
}

result<gptq_config> gptq_config_find(const std::string& folder) {
    for (const char* name : {"quantize_config.json", "quant_config.json"}) {
        const std::string path = path_join(folder, name);
        if (file_exists(path)) {
            GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(path));
            return gptq_config_parse(j, path);
        }
    }
    const std::string cfg = path_join(folder, "config.json");
    if (file_exists(cfg)) {
        GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(cfg));
        if (j.is_object() && j.contains("quantization_config") && !j.at("quantization_config").is_null())
            return gptq_config_parse(j.at("quantization_config"), cfg + " quantization_config");
    }
    return make_error(status_code::STATUS_NOT_FOUND,
                      "{}: no GPTQ quantization config (quantize_config.json, "
                      "quant_config.json or config.json quantization_config)",
                      folder);
}

}  // namespace gptq
