// The OpenAI request and response bodies of `gptq serve` (serve_api.h).
#include "serve_api.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

namespace gptq {

namespace {
using json = nlohmann::json;

api_error bad(const std::string& param, const std::string& message) {
    return api_error{400, message, "invalid_request_error", param, ""};
}

std::string type_name(const json& v) {
    return v.is_number_integer() ? "an integer" : v.is_number() ? "a number" : std::string("a ") + v.type_name();
}

// Each reader: absent or null leaves `out` as it is; a wrong type or range is an error.
std::optional<api_error> read_bool(const json& b, const char* key, bool& out) {
    if (!b.contains(key) || b[key].is_null()) return std::nullopt;
    if (!b[key].is_boolean()) return bad(key, fmt::format("'{}' must be a boolean, got {}", key, type_name(b[key])));
    out = b[key].get<bool>();
    return std::nullopt;
}

std::optional<api_error> read_int(const json& b, const char* key, int64_t lo, int64_t hi, int64_t& out,
                                  bool* given = nullptr) {
    if (!b.contains(key) || b[key].is_null()) return std::nullopt;
    const json& v = b[key];
    if (!v.is_number_integer()) return bad(key, fmt::format("'{}' must be an integer, got {}", key, type_name(v)));
    const bool neg = v.is_number_unsigned() ? false : v.get<int64_t>() < 0;
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        return bad(key, fmt::format("'{}' is {}, expected {} .. {}", key, v.dump(), lo, hi));
    const int64_t x = v.get<int64_t>();
    if ((neg && x < lo) || x < lo || x > hi)
        return bad(key, fmt::format("'{}' is {}, expected {} .. {}", key, x, lo, hi));
    out = x;
    if (given) *given = true;
    return std::nullopt;
}

std::optional<api_error> read_float(const json& b, const char* key, double lo, double hi, bool lo_open, float& out) {
    if (!b.contains(key) || b[key].is_null()) return std::nullopt;
    const json& v = b[key];
    if (!v.is_number()) return bad(key, fmt::format("'{}' must be a number, got {}", key, type_name(v)));
    const double x = v.get<double>();
    if (!std::isfinite(x) || x < lo || x > hi || (lo_open && x == lo))
        return bad(key, fmt::format("'{}' is {}, expected {}{} .. {}]", key, v.dump(), lo_open ? "(" : "[", lo, hi));
    out = static_cast<float>(x);
    return std::nullopt;
}

// Fields we do not implement: refused unless absent or at their no-op value.
std::optional<api_error> refuse_unsupported(const json& b) {
    auto present = [&](const char* k) { return b.contains(k) && !b[k].is_null(); };
    if (present("n") && !(b["n"].is_number_integer() && b["n"].get<int64_t>() == 1))
        return bad("n",
                   fmt::format("'n' is {}: only n = 1 is supported (send several requests instead)", b["n"].dump()));
    if (present("best_of") && !(b["best_of"].is_number_integer() && b["best_of"].get<int64_t>() == 1))
        return bad("best_of", "'best_of' other than 1 is not supported");
    if (present("echo") && !(b["echo"].is_boolean() && !b["echo"].get<bool>()))
        return bad("echo", "'echo' is not supported");
    if (present("suffix")) return bad("suffix", "'suffix' is not supported");
    if (present("logit_bias") && !(b["logit_bias"].is_object() && b["logit_bias"].empty()))
        return bad("logit_bias", "'logit_bias' is not supported");
    if (present("tools") && !(b["tools"].is_array() && b["tools"].empty()))
        return bad("tools", "'tools' (function calling) is not supported");
    if (present("response_format") &&
        !(b["response_format"].is_object() && b["response_format"].value("type", json()) == "text"))
        return bad("response_format", "'response_format' other than {\"type\": \"text\"} is not supported");
    return std::nullopt;
}

std::optional<api_error> read_prompt(const json& b, api_request& out) {
    if (!b.contains("prompt") || b["prompt"].is_null()) return bad("prompt", "'prompt' is required");
    const json* p = &b["prompt"];
    // A list of one prompt (string or ids) is that prompt; several are refused (n = 1 per request).
    if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
    if (p->is_string()) {
        out.prompt_text = p->get<std::string>();
        return std::nullopt;
    }
    if (p->is_array() && !p->empty()) {
        for (const json& t : *p) {
            if (t.is_string() || t.is_array())
                return bad("prompt", fmt::format("'prompt' is a list of {} prompts: send one prompt per request",
                                                 b["prompt"].size()));
            if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
                return bad("prompt", fmt::format("'prompt' token ids must be integers >= 0, got {}", t.dump()));
            out.prompt_ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
        }
        out.prompt_is_ids = true;
        return std::nullopt;
    }
    return bad("prompt", fmt::format("'prompt' must be a string, a list of token ids or a list of one of those, got {}",
                                     type_name(*p)));
}

std::optional<api_error> read_messages(const json& b, api_request& out) {
    if (!b.contains("messages") || !b["messages"].is_array() || b["messages"].empty())
        return bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects");
    for (size_t i = 0; i < b["messages"].size(); ++i) {
        const json&       m     = b["messages"][i];
        const std::string param = fmt::format("messages[{}]", i);
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
            return bad(param, fmt::format("'{}' must be an object with a string 'role'", param));
        chat_message msg;
        msg.role = m["role"].get<std::string>();
        if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" && msg.role != "developer")
            return bad(param + ".role", fmt::format("'{}.role' is '{}', expected system, developer, user or assistant",
                                                    param, msg.role));
        if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for it
        const json c = m.value("content", json());
        if (c.is_string()) {
            msg.content = c.get<std::string>();
        } else if (c.is_array()) {  // content parts: text only
            for (const json& part : c) {
                if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
                    !part["text"].is_string())
                    return bad(param + ".content",
                               fmt::format("'{}.content': only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                           "supported",
                                           param));
                msg.content += part["text"].get<std::string>();
            }
        } else if (!(c.is_null() && msg.role == "assistant")) {
            return bad(param + ".content", fmt::format("'{}.content' must be a string or a list of text parts", param));
        }
        out.messages.push_back(std::move(msg));
    }
    return std::nullopt;
}

std::optional<api_error> read_stop(const json& b, std::vector<std::string>& out) {
    if (!b.contains("stop") || b["stop"].is_null()) return std::nullopt;
    const json&       s = b["stop"];
    std::vector<json> items;
    if (s.is_string())
        items.push_back(s);
    else if (s.is_array())
        items.assign(s.begin(), s.end());
    else
        return bad("stop", fmt::format("'stop' must be a string or a list of strings, got {}", type_name(s)));
    if (items.size() > 16) return bad("stop", fmt::format("'stop' has {} strings, at most 16", items.size()));
    for (const json& x : items) {
        if (!x.is_string() || x.get<std::string>().empty())
            return bad("stop", "'stop' strings must be non-empty strings");
        out.push_back(x.get<std::string>());
    }
    return std::nullopt;
}

std::optional<api_error> read_sampling(const json& b, api_request& out) {
    sampling_params& sp = out.run.sampling;
    sp.temperature      = 1.0f;  // OpenAI's defaults: sampling at temperature 1, no top-k
    sp.top_k            = 0;
    std::optional<api_error> e;
    if ((e = read_float(b, "temperature", 0.0, 2.0, false, sp.temperature))) return e;
    if ((e = read_float(b, "top_p", 0.0, 1.0, true, sp.top_p))) return e;
    if ((e = read_float(b, "min_p", 0.0, 1.0, false, sp.min_p))) return e;
    if ((e = read_float(b, "repetition_penalty", 0.0, 10.0, true, sp.repetition_penalty))) return e;
    if ((e = read_float(b, "presence_penalty", -2.0, 2.0, false, sp.presence_penalty))) return e;
    if ((e = read_float(b, "frequency_penalty", -2.0, 2.0, false, sp.frequency_penalty))) return e;
    int64_t top_k = 0;
    if ((e = read_int(b, "top_k", -1, INT32_MAX, top_k))) return e;
    sp.top_k     = top_k < 0 ? 0 : static_cast<int32_t>(top_k);  // -1: off (vLLM's spelling)
    int64_t seed = 0;
    if ((e = read_int(b, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), seed,
                      &out.seed_given)))
        return e;
    sp.seed      = static_cast<uint64_t>(seed);
    sp.do_sample = sp.temperature > 0.0f;
    return std::nullopt;
}

std::optional<api_error> read_logprobs(const json& b, api_request& out) {
    std::optional<api_error> e;
    if (out.kind == api_kind::API_COMPLETIONS) {
        int64_t n = -1;
        if ((e = read_int(b, "logprobs", 0, 20, n))) return e;
        out.run.logprobs = static_cast<int32_t>(n);
        return std::nullopt;
    }
    if ((e = read_bool(b, "logprobs", out.chat_logprobs))) return e;
    int64_t top   = 0;
    bool    given = false;
    if ((e = read_int(b, "top_logprobs", 0, 20, top, &given))) return e;
    if (given && !out.chat_logprobs) return bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    out.run.logprobs = out.chat_logprobs ? static_cast<int32_t>(top) : -1;
    return std::nullopt;
}
}  // namespace

nlohmann::ordered_json api_error_json(const api_error& e) {
    nlohmann::ordered_json j;
    j["error"]["message"] = e.message;
    j["error"]["type"]    = e.type;
    j["error"]["param"]   = e.param.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(e.param);
    j["error"]["code"]    = e.code.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(e.code);
    return j;
}

std::optional<api_error> api_request_parse(const std::string& body, api_kind kind, api_request& out) {
    out      = api_request{};
    out.kind = kind;
    json b;
    try {
        b = json::parse(body);
    } catch (const json::exception& ex) {
        return bad("", fmt::format("the body is not valid JSON: {}", ex.what()));
    }
    if (!b.is_object()) return bad("", fmt::format("the body must be a JSON object, got {}", type_name(b)));
    if (b.contains("model") && !b["model"].is_null()) {
        if (!b["model"].is_string()) return bad("model", "'model' must be a string");
        out.model = b["model"].get<std::string>();
    }
    std::optional<api_error> e;
    if ((e = refuse_unsupported(b))) return e;
    if ((e = kind == api_kind::API_COMPLETIONS ? read_prompt(b, out) : read_messages(b, out))) return e;
    out.run.max_tokens = 16;  // completions' default; chat: the server fills in what the context leaves
    if ((e = read_int(b, "max_tokens", 1, std::numeric_limits<int64_t>::max(), out.run.max_tokens,
                      &out.max_tokens_given)))
        return e;
    if (kind == api_kind::API_CHAT && (e = read_int(b, "max_completion_tokens", 1, std::numeric_limits<int64_t>::max(),
                                                    out.run.max_tokens, &out.max_tokens_given)))
        return e;
    if ((e = read_sampling(b, out))) return e;
    if ((e = read_stop(b, out.run.stop))) return e;
    if ((e = read_logprobs(b, out))) return e;
    if ((e = read_bool(b, "ignore_eos", out.run.ignore_eos))) return e;
    if ((e = read_int(b, "truncate_prompt_tokens", 1, std::numeric_limits<int64_t>::max(), out.truncate_prompt)))
        return e;
    if ((e = read_bool(b, "stream", out.stream))) return e;
    if (b.contains("stream_options") && !b["stream_options"].is_null()) {
        const json& so = b["stream_options"];
        if (!so.is_object()) return bad("stream_options", "'stream_options' must be an object");
        if (!out.stream) return bad("stream_options", "'stream_options' is only allowed with 'stream': true");
        if ((e = read_bool(so, "include_usage", out.include_usage))) return e;
    }
    if (b.contains("user") && !b["user"].is_null() && !b["user"].is_string())
        return bad("user", "'user' must be a string");
    return std::nullopt;
}

namespace {
using ojson = nlohmann::ordered_json;

ojson head_json(const api_request& r, const api_response_head& h, bool chunk) {
    ojson j;
    j["id"] = h.id;
    j["object"] =
        r.kind == api_kind::API_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    j["created"] = h.created;
    j["model"]   = h.model;
    return j;
}

ojson bytes_of(const std::string& s) {
    ojson a = ojson::array();
    for (unsigned char c : s) a.push_back(static_cast<int>(c));
    return a;
}

// Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
// Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}.
ojson logprobs_json(const api_request& r, const std::vector<api_token>& toks, int64_t text_offset0) {
    if (r.kind == api_kind::API_CHAT) {
        ojson content = ojson::array();
        for (const api_token& t : toks) {
            ojson x;
            x["token"]        = t.text;
            x["logprob"]      = t.lp.logprob;
            x["bytes"]        = bytes_of(t.text);
            x["top_logprobs"] = ojson::array();
            for (size_t i = 0; i < t.top.size(); ++i)
                x["top_logprobs"].push_back(
                    {{"token", t.top[i].first}, {"logprob", t.top[i].second}, {"bytes", bytes_of(t.top[i].first)}});
            content.push_back(std::move(x));
        }
        return {{"content", content}};
    }
    ojson   tokens = ojson::array(), lps = ojson::array(), tops = ojson::array(), offs = ojson::array();
    int64_t off = text_offset0;
    for (const api_token& t : toks) {
        tokens.push_back(t.text);
        lps.push_back(t.lp.logprob);
        ojson top = ojson::object();
        for (const auto& [text, lp] : t.top)
            if (!top.contains(text)) top[text] = lp;  // two ids with one text: the likelier
        tops.push_back(std::move(top));
        offs.push_back(off);
        off += static_cast<int64_t>(t.text.size());
    }
    return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

ojson usage_json(const api_usage& u) {
    return {{"prompt_tokens", u.prompt_tokens},
            {"completion_tokens", u.completion_tokens},
            {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}
}  // namespace

nlohmann::ordered_json api_response_json(const api_request& r, const api_response_head& h, const std::string& text,
                                         const std::string& finish_reason, const api_usage& usage,
                                         const std::vector<api_token>* logprobs) {
    ojson j = head_json(r, h, false);
    ojson c;
    c["index"] = 0;
    if (r.kind == api_kind::API_CHAT)
        c["message"] = {{"role", "assistant"}, {"content", text}};
    else
        c["text"] = text;
    c["logprobs"]      = logprobs ? logprobs_json(r, *logprobs, 0) : ojson();
    c["finish_reason"] = finish_reason;
    j["choices"]       = ojson::array({c});
    j["usage"]         = usage_json(usage);
    return j;
}

nlohmann::ordered_json api_chunk_json(const api_request& r, const api_response_head& h, const std::string& text,
                                      const std::optional<std::string>& finish_reason, bool first,
                                      const std::vector<api_token>* logprobs) {
    ojson j = head_json(r, h, true);
    ojson c;
    c["index"] = 0;
    if (r.kind == api_kind::API_CHAT) {
        ojson delta = ojson::object();
        if (first) delta["role"] = "assistant";
        if (!text.empty() || first) delta["content"] = text;
        c["delta"] = delta;
    } else {
        c["text"] = text;
    }
    c["logprobs"]      = logprobs && !logprobs->empty() ? logprobs_json(r, *logprobs, 0) : ojson();
    c["finish_reason"] = finish_reason ? ojson(*finish_reason) : ojson();
    j["choices"]       = ojson::array({c});
    if (r.include_usage) j["usage"] = ojson();  // OpenAI: null on every chunk but the last
    return j;
}

nlohmann::ordered_json api_usage_chunk_json(const api_request& r, const api_response_head& h, const api_usage& usage) {
    ojson j      = head_json(r, h, true);
    j["choices"] = ojson::array();
    j["usage"]   = usage_json(usage);
    return j;
}

}  // namespace gptq
