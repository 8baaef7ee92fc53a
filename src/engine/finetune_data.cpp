// Training data of gptq finetune (finetune_train.h): .txt and .jsonl ("text" or chat "messages")
// into sequences of at most seqlen tokens with their loss targets. docs/lora.md "Fine-tuning".
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "finetune_train.h"
#include "gptq/chat.h"
#include "io/json_file.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

namespace {
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;

// ids cut into windows of seqlen tokens, each trained on every next token inside it.
void add_windows(const std::vector<int32_t>& ids, int64_t seqlen, finetune_data* out) {
    const int64_t n = static_cast<int64_t>(ids.size());
    for (int64_t s = 0; s < n; s += seqlen) {
        const int64_t len = std::min(seqlen, n - s);
        if (len < 2) {
            ++out->n_dropped;
            continue;
        }
        finetune_seq q;
        q.ids.assign(ids.begin() + s, ids.begin() + s + len);
        q.targets.assign(q.ids.begin() + 1, q.ids.end());
        q.targets.push_back(-1);
        out->seqs.push_back(std::move(q));
    }
}

// Tokens of text[0, n_chars) that agree with the tokens of the whole text: the token boundary
// nearest below a character boundary (a token spanning it stays with the earlier side).
int64_t token_boundary(const tokenizer& tok, const std::string& text, size_t n_chars, const std::vector<int32_t>& all) {
    const std::vector<int32_t> pre = tok.encode(std::string_view(text).substr(0, n_chars), /*add_special=*/false);
    size_t                     k   = 0;
    while (k < pre.size() && k < all.size() && pre[k] == all[k]) ++k;
    return static_cast<int64_t>(k);
}

result<std::string> render(const tokenizer& tok, const std::string& tmpl, const std::vector<chat_message>& m,
                           bool gen_prompt) {
    chat_template_vars v;
    v.bos_token             = tok.config().bos_token.value_or("");
    v.eos_token             = tok.config().eos_token.value_or("");
    v.add_generation_prompt = gen_prompt;
    return chat_template_render(tmpl, m, v);
}

// A chat sample: the rendered conversation, trained on the tokens of each assistant message (from
// the end of the prompt the template renders before it to the end of the message, the template's
// end-of-turn marker included).
status add_chat(const tokenizer& tok, const std::string& tmpl, const nlohmann::json& msgs, const std::string& where,
                int64_t seqlen, finetune_data* out) {
    if (tmpl.empty())
        return make_error(E_ARG,
                          "{}: \"messages\" needs a chat template, and the model's tokenizer_config.json has none "
                          "(give one with --chat-template FILE)",
                          where);
    if (!msgs.is_array() || msgs.empty())
        return make_error(E_ARG, "{}: \"messages\" must be a non-empty array of {{\"role\", \"content\"}}", where);
    std::vector<chat_message> m;
    for (const auto& e : msgs) {
        if (!e.is_object() || !e.contains("role") || !e["role"].is_string() || !e.contains("content") ||
            !e["content"].is_string())
            return make_error(E_ARG, "{}: each message must be an object with string \"role\" and \"content\", got {}",
                              where, json_fields::quote(e));
        m.push_back({e["role"].get<std::string>(), e["content"].get<std::string>()});
    }
    GPTQ_ASSIGN_OR_RETURN(std::string full, render(tok, tmpl, m, false));
    const std::vector<int32_t> ids = tok.encode(full, /*add_special=*/false);
    std::vector<bool>          trained(ids.size(), false);
    for (size_t i = 0; i < m.size(); ++i) {
        if (m[i].role != "assistant") continue;
        const std::vector<chat_message> head(m.begin(), m.begin() + static_cast<std::ptrdiff_t>(i));
        const std::vector<chat_message> upto(m.begin(), m.begin() + static_cast<std::ptrdiff_t>(i + 1));
        GPTQ_ASSIGN_OR_RETURN(std::string pre, render(tok, tmpl, head, true));
        GPTQ_ASSIGN_OR_RETURN(std::string end, render(tok, tmpl, upto, false));
        if (!full.starts_with(end) || !end.starts_with(pre))
            return make_error(E_ARG,
                              "{}: the chat template renders the conversation up to message {} differently from its "
                              "start in the whole conversation; cannot find the assistant's tokens",
                              where, i);
        const int64_t t0 = token_boundary(tok, full, pre.size(), ids);
        const int64_t t1 =
            end.size() == full.size() ? static_cast<int64_t>(ids.size()) : token_boundary(tok, full, end.size(), ids);
        for (int64_t t = t0; t < t1; ++t) trained[static_cast<size_t>(t)] = true;
    }
    finetune_seq  q;
    const int64_t n = std::min<int64_t>(seqlen, static_cast<int64_t>(ids.size()));
    if (static_cast<int64_t>(ids.size()) > seqlen) ++out->n_truncated;
    q.ids.assign(ids.begin(), ids.begin() + n);
    q.targets.assign(static_cast<size_t>(n), -1);
    bool any = false;
    for (int64_t t = 0; t + 1 < n; ++t)
        if (trained[static_cast<size_t>(t + 1)]) {
            q.targets[static_cast<size_t>(t)] = q.ids[static_cast<size_t>(t + 1)];
            any                               = true;
        }
    if (!any) {
        ++out->n_dropped;
        return status::ok();
    }
    out->seqs.push_back(std::move(q));
    return status::ok();
}

result<finetune_data> read_jsonl(const std::string& path, const tokenizer& tok, const std::string& tmpl,
                                 int64_t seqlen) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return make_error(status_code::STATUS_NOT_FOUND, "--data {}: cannot open", path);
    finetune_data out;
    std::string   line;
    int64_t       i_line = 0;
    while (std::getline(in, line)) {
        ++i_line;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = fmt::format("{}:{}", path, i_line);
        auto              j     = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() || !j.is_object()) return make_error(E_ARG, "{}: not a JSON object", where);
        if (j.contains("text") && j["text"].is_string()) {
            add_windows(tok.encode(j["text"].get<std::string>(), /*add_special=*/true), seqlen, &out);
        } else if (j.contains("messages")) {
            GPTQ_TRY(add_chat(tok, tmpl, j["messages"], where, seqlen, &out));
        } else {
            return make_error(E_ARG, "{}: expected a string \"text\" or an array \"messages\"; the object has keys {}",
                              where, json_fields::quote(j));
        }
    }
    return out;
}
}  // namespace

result<finetune_data> finetune_data_read(const std::string& path, const tokenizer& tok, int64_t seqlen,
                                         const std::string& chat_template) {
    finetune_data out;
    if (path.ends_with(".jsonl")) {
        const std::string& tmpl = chat_template.empty() ? tok.config().chat_template : chat_template;
        GPTQ_ASSIGN_OR_RETURN(out, read_jsonl(path, tok, tmpl, seqlen));
    } else if (path.ends_with(".txt")) {
        GPTQ_ASSIGN_OR_RETURN(std::string text, file_read_all(path));
        if (text.find_first_not_of(" \t\r\n") != std::string::npos)
            add_windows(tok.encode(text, /*add_special=*/true), seqlen, &out);
    } else {
        return make_error(E_ARG, "--data {}: expected a .txt or .jsonl file", path);
    }
    if (out.seqs.empty())
        return make_error(E_ARG, "--data {}: no training tokens (empty, or no sequence of 2 tokens or more{})", path,
                          path.ends_with(".jsonl") ? ", or no assistant message" : "");
    return out;
}

}  // namespace gptq
