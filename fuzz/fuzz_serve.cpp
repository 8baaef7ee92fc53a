// Fuzz entry point for `gptq serve`'s request bodies (src/engine/serve_api.h): what a client sends
// over the network is hostile input. The parsed request's stop strings also run through stop_text
// over a fixed text, and its response bodies are built and serialized.
#include <string>
#include <vector>

#include "engine/serve_api.h"
#include "engine/stop_text.h"
#include "fuzz_targets.h"

namespace gptq::fuzz {

int fuzz_serve_request(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    const api_kind    kind = data[0] & 1 ? api_kind::API_CHAT : api_kind::API_COMPLETIONS;
    const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
    api_request       r;
    if (auto e = api_request_parse(body, kind, r)) {
        // A refusal is a 4xx with a message, and its body serializes.
        if (e->message.empty() || e->http_status < 400 || e->http_status > 499) __builtin_trap();
        (void)api_error_json(*e).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        return 0;
    }
    if (r.run.max_tokens < 1 || r.run.logprobs < -1 || r.run.logprobs > 20) __builtin_trap();
    stop_text         t(r.run.stop);
    const std::string text = "Once upon a time, there was a kernel: \xe2\x82\xac 42.\n";
    std::string       out;
    for (char c : text) out += t.push(std::string(1, c));
    out += t.push("", /*final=*/true);
    if (out != t.text()) __builtin_trap();  // what came out is exactly the text kept
    for (const auto& s : r.run.stop)
        if (t.text().find(s) != std::string::npos) __builtin_trap();  // cut before any stop string
    const api_response_head      h{"id", 0, "m"};
    const std::vector<api_token> none;
    (void)api_response_json(r, h, t.text(), "stop", {1, 2}, &none)
        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    (void)api_chunk_json(r, h, t.text(), std::nullopt, true, &none)
        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return 0;
}

}  // namespace gptq::fuzz
