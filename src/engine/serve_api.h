// The OpenAI API of `gptq serve` as data: request bodies of /v1/completions and
// /v1/chat/completions parsed and checked into an api_request, and the response, stream-chunk and
// error bodies built as JSON (docs/serve.md lists the fields). No HTTP and no model here: the
// server (serve.cpp) tokenizes, runs the scheduler and sends what these functions build.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "gptq/chat.h"
#include "serve_scheduler.h"

namespace gptq {

// An error as OpenAI sends it: {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct api_error {
    int         http_status = 400;
    std::string message;
    std::string type = "invalid_request_error";
    std::string param;  // the request field at fault; "" -> null
    std::string code;   // "" -> null
};
nlohmann::ordered_json api_error_json(const api_error& e);

enum class api_kind { API_COMPLETIONS, API_CHAT };

struct api_request {
    api_kind                  kind = api_kind::API_COMPLETIONS;
    std::string               model;  // "" when the body has none
    std::string               prompt_text;
    std::vector<int32_t>      prompt_ids;  // completions: a prompt given as token ids
    bool                      prompt_is_ids = false;
    std::vector<chat_message> messages;  // chat
    serve_request             run;       // everything but the prompt (max_tokens: the default when not given)
    bool                      max_tokens_given = false;
    bool                      seed_given       = false;
    bool                      stream           = false;
    bool                      include_usage    = false;  // stream_options.include_usage
    bool                      chat_logprobs    = false;  // chat: logprobs: true (top_logprobs in run.logprobs)
    int64_t                   truncate_prompt  = 0;      // > 0: keep the prompt's last N tokens (vLLM's
                                                         // truncate_prompt_tokens); 0: too long is an error
};

// Parse and check a request body. Unknown fields are ignored (clients send extras); fields we do
// not implement with a non-default value (n > 1, echo, suffix, best_of, logit_bias, tools) are
// refused naming the field. Defaults are OpenAI's: temperature 1, top_p 1, max_tokens 16 for
// completions (chat: what the context leaves, filled in by the server).
std::optional<api_error> api_request_parse(const std::string& body, api_kind kind, api_request& out);

// One token of a logprobs list, with the texts the response needs.
struct api_token {
    token_logprob                              lp;
    std::string                                text;  // the token's text
    std::vector<std::pair<std::string, float>> top;   // the alternatives' texts
};

struct api_usage {
    int64_t prompt_tokens = 0, completion_tokens = 0;
};

// What identifies one response: "cmpl-..."/"chatcmpl-..." id, creation time, model name.
struct api_response_head {
    std::string id;
    int64_t     created = 0;
    std::string model;
};

// The whole (non-stream) response. logprobs: nullopt -> null.
nlohmann::ordered_json api_response_json(const api_request& r, const api_response_head& h, const std::string& text,
                                         const std::string& finish_reason, const api_usage& usage,
                                         const std::vector<api_token>* logprobs);

// One chunk of a stream: new text (and its tokens' logprobs), then a last chunk with the finish
// reason. Chat: the first chunk carries the role. usage: a final chunk with empty choices.
nlohmann::ordered_json api_chunk_json(const api_request& r, const api_response_head& h, const std::string& text,
                                      const std::optional<std::string>& finish_reason, bool first,
                                      const std::vector<api_token>* logprobs);
nlohmann::ordered_json api_usage_chunk_json(const api_request& r, const api_response_head& h, const api_usage& usage);

}  // namespace gptq
