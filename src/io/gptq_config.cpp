#define PCRE2_CODE_UNIT_WIDTH 8
#include "io/gptq_config.h"

#include <pcre2.h>

#include "core/error.h"
#include "core/log.h"

namespace gptq {

namespace {
constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;
constexpr auto E_UNSUP = status_code::STATUS_UNSUPPORTED;
}  // namespace

// GPTQModel matches `dynamic` keys with Python's re / the pcre module; PCRE2 reads the same
// syntax for the patterns such keys use (classes, groups, alternation, escapes).
class gptq_module_regex {
public:
    static result<std::shared_ptr<const gptq_module_regex>> compile(const std::string& pattern,
                                                                    const std::string& where) {
        int         err_code   = 0;
        PCRE2_SIZE  err_offset = 0;
        pcre2_code* code       = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF,
                                               &err_code, &err_offset, nullptr);
        if (!code) {
            PCRE2_UCHAR buf[256];
            pcre2_get_error_message(err_code, buf, sizeof(buf));
            return make_error(E_PARSE, "{}: regex '{}' does not compile at offset {}: {}", where, pattern, err_offset,
                              reinterpret_cast<const char*>(buf));
        }
        return std::shared_ptr<const gptq_module_regex>(new gptq_module_regex(code));
    }
    ~gptq_module_regex() { pcre2_code_free(code_); }
    gptq_module_regex(const gptq_module_regex&)            = delete;
    gptq_module_regex& operator=(const gptq_module_regex&) = delete;

    // A match that starts at the first character (re.match); it may end anywhere.
    bool match_at_start(const std::string& s) const {
        pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
        const int         rc =
            pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, PCRE2_ANCHORED, md, nullptr);
        pcre2_match_data_free(md);
        return rc >= 0;
    }

private:
    explicit gptq_module_regex(pcre2_code* code) : code_(code) {}
    pcre2_code* code_ = nullptr;
};

bool gptq_dynamic_rule::matches(const std::string& module) const {
    return regex && regex->match_at_start(module);
}

namespace {

result<int> parse_bits(const json_fields& f, const char* key, const std::string& where) {
    GPTQ_ASSIGN_OR_RETURN(int64_t bits, f.get_int(key));
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return make_error(E_UNSUP, "{}: bits {} is not supported (2, 3, 4 or 8)", where, bits);
    return static_cast<int>(bits);
}

result<int> parse_group_size(const json_fields& f, const char* key, const std::string& where) {
    GPTQ_ASSIGN_OR_RETURN(int64_t gs, f.get_int(key));
    if (gs != -1 && (gs <= 0 || gs > (int64_t(1) << 24)))
        return make_error(E_PARSE, "{}: group_size {} must be -1 or a positive integer", where, gs);
    return static_cast<int>(gs);
}

// One `dynamic` entry (GPTQModel's per-module overrides: bits, group_size, desc_act, sym,
// pack_dtype; other keys, such as adapter settings, do not change how the tensors are read).
result<gptq_dynamic_rule> parse_dynamic_rule(const std::string& key, const json& value, const std::string& where) {
    gptq_dynamic_rule r;
    r.key                  = key;
    const std::string wkey = fmt::format("{} dynamic '{}'", where, key);
    if (key.rfind("-:", 0) == 0) {
        r.skip    = true;
        r.pattern = key.substr(2);
    } else {
        r.pattern = key.rfind("+:", 0) == 0 ? key.substr(2) : key;
    }
    GPTQ_ASSIGN_OR_RETURN(r.regex, gptq_module_regex::compile(r.pattern, wkey));
    if (r.skip) return r;
    if (!value.is_object())
        return make_error(E_PARSE, "{}: the overrides are {}, expected an object", wkey, json_fields::quote(value));
    json_fields f{value, wkey};
    if (f.has("bits")) {
        GPTQ_ASSIGN_OR_RETURN(r.bits, parse_bits(f, "bits", wkey));
    }
    if (f.has("group_size")) {
        GPTQ_ASSIGN_OR_RETURN(r.group_size, parse_group_size(f, "group_size", wkey));
    }
    if (f.has("desc_act")) {
        GPTQ_ASSIGN_OR_RETURN(r.desc_act, f.get_bool_or("desc_act", false));
    }
    if (f.has("sym")) {
        GPTQ_ASSIGN_OR_RETURN(r.sym, f.get_bool_or("sym", true));
    }
    GPTQ_ASSIGN_OR_RETURN(std::string pack, f.get_string_or("pack_dtype", "int32"));
    if (pack != "int32") return make_error(E_UNSUP, "{}: pack_dtype '{}' is not supported (only int32)", wkey, pack);
    return r;
}

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

result<gptq_config> gptq_config_parse(const json& j, const std::string& where,
                                      const std::vector<std::string>& dynamic_order) {
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

    GPTQ_ASSIGN_OR_RETURN(c.bits, parse_bits(f, f.has("bits") ? "bits" : "w_bit", where));
    if (f.has("group_size")) {
        GPTQ_ASSIGN_OR_RETURN(c.group_size, parse_group_size(f, "group_size", where));
    } else if (f.has("q_group_size")) {
        GPTQ_ASSIGN_OR_RETURN(c.group_size, parse_group_size(f, "q_group_size", where));
    } else {
        return make_error(E_PARSE, "{}: missing required key 'group_size'", where);
    }

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

    if (f.has("dynamic")) {
        const json& d = j.at("dynamic");
        if (!d.is_object())
            return make_error(E_PARSE, "{}: dynamic is {}, expected an object of regex -> overrides", where,
                              json_fields::quote(d));
        std::vector<std::string> keys;
        for (const auto& k : dynamic_order)
            if (d.contains(k)) keys.push_back(k);
        if (keys.size() != d.size()) {  // no (complete) file order: the object's own
            keys.clear();
            for (auto it = d.begin(); it != d.end(); ++it) keys.push_back(it.key());
        }
        for (const auto& k : keys) {
            GPTQ_ASSIGN_OR_RETURN(gptq_dynamic_rule r, parse_dynamic_rule(k, d.at(k), where));
            c.dynamic.push_back(std::move(r));
        }
    }
    return c;
}

const gptq_dynamic_rule* gptq_config::dynamic_rule_for(const std::string& module) const {
    for (const auto& r : dynamic)
        if (r.matches(module)) return &r;
    return nullptr;
}

std::optional<gptq_config> gptq_config::for_module(const std::string& module) const {
    const gptq_dynamic_rule* r = dynamic_rule_for(module);
    if (r && r->skip) return std::nullopt;
    gptq_config c = *this;
    c.dynamic.clear();
    c.raw = json();
    if (!r) return c;
    c.source = fmt::format("{} dynamic '{}'", source, r->key);
    if (r->bits) c.bits = *r->bits;
    if (r->group_size) c.group_size = *r->group_size;
    if (r->desc_act) c.desc_act = *r->desc_act;
    if (r->sym) c.sym = *r->sym;
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
    if (!dynamic.empty()) {  // GPTQModel's per-module rules (the keys as written, prefix included)
        json d = json::object();
        for (const auto& r : dynamic) {
            json o = json::object();
            if (r.bits) o["bits"] = *r.bits;
            if (r.group_size) o["group_size"] = *r.group_size;
            if (r.desc_act) o["desc_act"] = *r.desc_act;
            if (r.sym) o["sym"] = *r.sym;
            d[r.key] = o;
        }
        j["dynamic"] = d;
    }
    return j;
}

result<gptq_config> gptq_config_read(const std::string& path, const char* key) {
    if (!file_exists(path)) return make_error(status_code::STATUS_NOT_FOUND, "{}: no such file", path);
    GPTQ_ASSIGN_OR_RETURN(std::string text, file_read_all(path));
    GPTQ_ASSIGN_OR_RETURN(json j, json_parse(text, path));
    const std::string where = key ? path + " " + key : path;
    const json*       obj   = &j;
    if (key) {
        if (!j.is_object() || !j.contains(key) || j.at(key).is_null())
            return make_error(status_code::STATUS_NOT_FOUND, "{}: no '{}'", path, key);
        obj = &j.at(key);
    }
    // The file order of `dynamic`'s keys (the first matching rule wins).
    std::vector<std::string> order;
    if (obj->is_object() && obj->contains("dynamic") && obj->at("dynamic").is_object()) {
        const auto  ordered = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
        const auto* o = key ? (ordered.is_object() && ordered.contains(key) ? &ordered.at(key) : nullptr) : &ordered;
        if (o && o->is_object() && o->contains("dynamic") && o->at("dynamic").is_object())
            for (auto it = o->at("dynamic").begin(); it != o->at("dynamic").end(); ++it) order.push_back(it.key());
    }
    return gptq_config_parse(*obj, where, order);
}

result<gptq_config> gptq_config_find(const std::string& folder) {
    const std::pair<const char*, const char*> files[] = {
        {"quantize_config.json", nullptr}, {"quant_config.json", nullptr}, {"config.json", "quantization_config"}};
    for (const auto& [name, key] : files) {
        auto c = gptq_config_read(path_join(folder, name), key);
        if (c.is_ok() || c.error().code() != status_code::STATUS_NOT_FOUND) return c;
    }
    return make_error(status_code::STATUS_NOT_FOUND,
                      "{}: no GPTQ quantization config (quantize_config.json, "
                      "quant_config.json or config.json quantization_config)",
                      folder);
}

}  // namespace gptq
