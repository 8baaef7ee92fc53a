// tokenizer::load: find the tokenizer files of a model folder, pick the back end, apply
// tokenizer_config.json / generation_config.json. Also the incremental (streaming) decoder.
#include "tokenizer/tokenizer.h"

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "tokenizer/loaders.h"
#include "tokenizer/utf8.h"

namespace gptq {

using json = nlohmann::json;

const char* tokenizer_kind_name(tokenizer_kind kind) {
    switch (kind) {
        case tokenizer_kind::TOKENIZER_KIND_HF_JSON:
            return "tokenizer.json";
        case tokenizer_kind::TOKENIZER_KIND_GPT2_FILES:
            return "vocab.json + merges.txt";
        case tokenizer_kind::TOKENIZER_KIND_SENTENCEPIECE:
            return "sentencepiece";
    }
    return "?";
}

namespace {

bool is_file(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
std::string join(const std::string& dir, const std::string& name) {
    return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// "bos_token": "<s>" or {"content": "<s>", ...} (transformers' AddedToken serialization).
std::optional<std::string> token_string(const json& cfg, const char* key) {
    auto it = cfg.find(key);
    if (it == cfg.end()) return std::nullopt;
    if (it->is_string()) return it->get<std::string>();
    if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
        return (*it)["content"].get<std::string>();
    return std::nullopt;
}

result<tokenizer_config> read_configs(const std::string& dir) {
    tokenizer_config  cfg;
    const std::string tc = join(dir, "tokenizer_config.json");
    if (is_file(tc)) {
        GPTQ_ASSIGN_OR_RETURN(json j, tokenizer_read_json(tc, tc));
        if (!j.is_object()) return make_error(status_code::STATUS_PARSE_ERROR, "{}: not a JSON object", tc);
        cfg.bos_token = token_string(j, "bos_token");
        cfg.eos_token = token_string(j, "eos_token");
        cfg.unk_token = token_string(j, "unk_token");
        cfg.pad_token = token_string(j, "pad_token");
        for (auto [key, dst] :
             {std::pair{"add_bos_token", &cfg.add_bos_token}, {"add_eos_token", &cfg.add_eos_token}}) {
            auto it = j.find(key);
            if (it == j.end() || it->is_null()) continue;
            if (!it->is_boolean())
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: '{}' must be true or false, got {}", tc, key,
                                  it->dump());
            *dst = it->get<bool>();
        }
        if (auto it = j.find("chat_template"); it != j.end()) {
            if (it->is_string()) {
                cfg.chat_template = it->get<std::string>();
            } else if (it->is_array()) {  // [{"name": "default", "template": "..."}, ...]
                for (const auto& t : *it) {
                    if (!t.is_object() || !t.contains("template") || !t["template"].is_string()) continue;
                    if (cfg.chat_template.empty() || t.value("name", "") == "default")
                        cfg.chat_template = t["template"].get<std::string>();
                }
            }
        }
    }
    const std::string gc = join(dir, "generation_config.json");
    if (is_file(gc)) {
        GPTQ_ASSIGN_OR_RETURN(json j, tokenizer_read_json(gc, gc));
        auto it = j.is_object() ? j.find("eos_token_id") : j.end();
        if (j.is_object() && it != j.end()) {
            if (it->is_number_integer()) cfg.generation_eos_ids.push_back(it->get<int32_t>());
            if (it->is_array())
                for (const auto& v : *it)
                    if (v.is_number_integer()) cfg.generation_eos_ids.push_back(v.get<int32_t>());
        }
    }
    return cfg;
}

}  // namespace

result<std::string> tokenizer_read_file(const std::string& path) {
    if (!is_file(path)) {
        if (is_dir(path)) return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: is a folder, not a file", path);
        return make_error(status_code::STATUS_NOT_FOUND, "{}: no such file", path);
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) return make_error(status_code::STATUS_IO_ERROR, "{}: cannot open", path);
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) return make_error(status_code::STATUS_IO_ERROR, "{}: read failed", path);
    return ss.str();
}

result<json> tokenizer_read_json(const std::string& path, const std::string& where) {
    GPTQ_ASSIGN_OR_RETURN(std::string text, tokenizer_read_file(path));
    json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
        // Find the position for the message (the non-throwing parse does not give it).
        std::string detail;
        try {
            const json again = json::parse(text);
            (void)again;
        } catch (const json::parse_error& e) {
            detail = fmt::format(" at byte {}", e.byte);
        }
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: invalid JSON{}", where, detail);
    }
    return j;
}

result<std::unique_ptr<tokenizer>> tokenizer_finish_load(std::unique_ptr<tokenizer> tok, const tokenizer_config& cfg) {
    tok->config_ = cfg;
    if (cfg.bos_token) {
        const int32_t id = tok->piece_to_id(*cfg.bos_token);
        if (id >= 0) tok->bos_id_ = id;
    }
    std::vector<int32_t> eos;
    if (cfg.eos_token) {
        const int32_t id = tok->piece_to_id(*cfg.eos_token);
        if (id >= 0) eos.push_back(id);
    } else {
        eos = tok->eos_ids_;
        if (eos.empty()) {
            for (const char* name : {"</s>", "<|endoftext|>", "<|end_of_text|>"}) {
                const int32_t id = tok->piece_to_id(name);
                if (id >= 0 && tok->is_special(id)) {
                    eos.push_back(id);
                    break;
                }
            }
        }
    }
    for (int32_t id : cfg.generation_eos_ids)
        if (id >= 0 && id < tok->vocab_size_ && std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
    tok->eos_ids_ = eos;
    tok->on_config();
    return tok;
}

result<std::unique_ptr<tokenizer>> tokenizer::load(const std::string& path_in) {
    std::string path = path_in;
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    std::string dir, chosen;
    if (is_dir(path)) {
        dir = path;
        if (is_file(join(dir, "tokenizer.json")))
            chosen = join(dir, "tokenizer.json");
        else if (is_file(join(dir, "vocab.json")) && is_file(join(dir, "merges.txt")))
            chosen = join(dir, "vocab.json");
        else if (is_file(join(dir, "tokenizer.model")))
            chosen = join(dir, "tokenizer.model");
        else
            return make_error(status_code::STATUS_NOT_FOUND,
                              "{}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model)",
                              path);
    } else if (is_file(path)) {
        chosen          = path;
        const size_t sl = path.rfind('/');
        dir             = sl == std::string::npos ? "." : path.substr(0, sl == 0 ? 1 : sl);
    } else {
        return make_error(status_code::STATUS_NOT_FOUND, "{}: no such file or folder", path);
    }

    GPTQ_ASSIGN_OR_RETURN(tokenizer_config cfg, read_configs(dir));
    const std::string          name = chosen.substr(chosen.rfind('/') == std::string::npos ? 0 : chosen.rfind('/') + 1);
    std::unique_ptr<tokenizer> tok;
    if (name == "vocab.json") {
        GPTQ_ASSIGN_OR_RETURN(tok, hf_tokenizer_from_gpt2_files(chosen, join(dir, "merges.txt")));
    } else if (name.size() >= 6 && name.compare(name.size() - 6, 6, ".model") == 0) {
        GPTQ_ASSIGN_OR_RETURN(tok, spm_tokenizer_load(chosen, true, false));
    } else if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".json") == 0) {
        GPTQ_ASSIGN_OR_RETURN(json j, tokenizer_read_json(chosen, chosen));
        GPTQ_ASSIGN_OR_RETURN(tok, hf_tokenizer_from_json(j, chosen));
    } else {
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "{}: not a tokenizer file (expected tokenizer.json, vocab.json or tokenizer.model)", chosen);
    }
    tok->source_path_ = chosen;
    return tokenizer_finish_load(std::move(tok), cfg);
}

// ---- incremental decoder ------------------------------------------------------------------------

namespace {
bool ends_with_replacement(const std::string& s) {
    return s.size() >= 3 && std::string_view(s).substr(s.size() - 3) == utf8_replacement;
}
}  // namespace

std::string incremental_decoder::step(int32_t id) {
    ids_.push_back(id);
    std::string text = tok_.decode(ids_, skip_special_);
    // Hold back while the newest bytes are an incomplete character (decoded as U+FFFD).
    if (text.size() <= prefix_.size() || ends_with_replacement(text)) return {};
    std::string out;
    if (text.compare(0, prefix_.size(), prefix_) == 0) {
        out = text.substr(prefix_.size());
    } else {
        // The new token changed how the context decodes (should not happen for the supported
        // decoders); emit from the first difference so nothing already printed is repeated wrongly.
        size_t k = 0;
        while (k < prefix_.size() && k < text.size() && prefix_[k] == text[k]) ++k;
        out = text.substr(k);
    }
    // Keep the tokens of this emission as context for the next one.
    ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(read_));
    read_   = ids_.size();
    prefix_ = tok_.decode(ids_, skip_special_);
    return out;
}

std::string incremental_decoder::finish() {
    if (ids_.size() == read_) return {};
    std::string text = tok_.decode(ids_, skip_special_);
    std::string out  = text.size() > prefix_.size() ? text.substr(prefix_.size()) : std::string();
    reset();
    return out;
}

void incremental_decoder::reset() {
    ids_.clear();
    read_ = 0;
    prefix_.clear();
}

}  // namespace gptq
