// The OpenAI request parsing and response bodies of `gptq serve` (src/engine/serve_api.h): fields,
// defaults, every refusal naming its field, and the shapes of responses, chunks and errors.
#include <gtest/gtest.h>

#include "engine/serve_api.h"

namespace gptq {
namespace {

using json = nlohmann::json;

api_request ok(const std::string& body, api_kind kind = api_kind::API_COMPLETIONS) {
    api_request r;
    auto        e = api_request_parse(body, kind, r);
    EXPECT_FALSE(e.has_value()) << body << " -> " << (e ? e->message : "");
    return r;
}

api_error refused(const std::string& body, api_kind kind = api_kind::API_COMPLETIONS) {
    api_request r;
    auto        e = api_request_parse(body, kind, r);
    EXPECT_TRUE(e.has_value()) << body;
    return e.value_or(api_error{});
}

TEST(ServeApi, CompletionDefaultsAreOpenAIs) {
    const api_request r = ok(R"({"model": "m", "prompt": "hi"})");
    EXPECT_EQ(r.model, "m");
    EXPECT_EQ(r.prompt_text, "hi");
    EXPECT_FALSE(r.prompt_is_ids);
    EXPECT_EQ(r.run.max_tokens, 16);
    EXPECT_FALSE(r.max_tokens_given);
    EXPECT_TRUE(r.run.sampling.do_sample);
    EXPECT_FLOAT_EQ(r.run.sampling.temperature, 1.0f);
    EXPECT_EQ(r.run.sampling.top_k, 0);
    EXPECT_EQ(r.run.logprobs, -1);
    EXPECT_FALSE(r.stream);
    EXPECT_FALSE(r.seed_given);
}

TEST(ServeApi, CompletionFields) {
    const api_request r = ok(R"({"prompt": [1, 2, 3], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 40,
        "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "stop": ["a", "bc"], "seed": 42, "logprobs": 3, "stream": true, "stream_options": {"include_usage": true},
        "user": "u", "n": 1, "echo": false, "unknown_field": {"x": 1}})");
    EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
    EXPECT_TRUE(r.prompt_is_ids);
    EXPECT_EQ(r.run.max_tokens, 7);
    EXPECT_TRUE(r.run.sampling.greedy());
    EXPECT_FLOAT_EQ(r.run.sampling.top_p, 0.5f);
    EXPECT_EQ(r.run.sampling.top_k, 40);
    EXPECT_FLOAT_EQ(r.run.sampling.min_p, 0.1f);
    EXPECT_FLOAT_EQ(r.run.sampling.repetition_penalty, 1.2f);
    EXPECT_FLOAT_EQ(r.run.sampling.presence_penalty, 0.5f);
    EXPECT_FLOAT_EQ(r.run.sampling.frequency_penalty, -0.5f);
    EXPECT_EQ(r.run.stop, (std::vector<std::string>{"a", "bc"}));
    EXPECT_EQ(r.run.sampling.seed, 42u);
    EXPECT_TRUE(r.seed_given);
    EXPECT_EQ(r.run.logprobs, 3);
    EXPECT_TRUE(r.stream);
    EXPECT_TRUE(r.include_usage);
    EXPECT_EQ(ok(R"({"prompt": ["one"]})").prompt_text, "one");
    EXPECT_EQ(ok(R"({"prompt": [[5, 6]]})").prompt_ids, (std::vector<int32_t>{5, 6}));
    EXPECT_EQ(ok(R"({"prompt": "x", "stop": "s"})").run.stop, std::vector<std::string>{"s"});
    EXPECT_EQ(ok(R"({"prompt": "x", "top_k": -1})").run.sampling.top_k, 0);
    EXPECT_EQ(ok(R"({"prompt": "x", "truncate_prompt_tokens": 100})").truncate_prompt, 100);
    EXPECT_EQ(refused(R"({"prompt": "x", "truncate_prompt_tokens": 0})").param, "truncate_prompt_tokens");
}

TEST(ServeApi, ChatFields) {
    const api_request r = ok(R"({"messages": [{"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null}], "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 2})",
                             api_kind::API_CHAT);
    ASSERT_EQ(r.messages.size(), 3u);
    EXPECT_EQ(r.messages[0].role, "system");
    EXPECT_EQ(r.messages[1].content, "ab");
    EXPECT_EQ(r.run.max_tokens, 9);
    EXPECT_TRUE(r.chat_logprobs);
    EXPECT_EQ(r.run.logprobs, 2);
    EXPECT_EQ(
        ok(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true})", api_kind::API_CHAT).run.logprobs,
        0);
}

TEST(ServeApi, RefusalsNameTheField) {
    struct bad_case {
        const char* body;
        const char* param;
    };
    const bad_case cases[] = {
        {R"({"prompt": "x", "max_tokens": "10"})", "max_tokens"},
        {R"({"prompt": "x", "max_tokens": 0})", "max_tokens"},
        {R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens"},
        {R"({"prompt": "x", "max_tokens": 99999999999999999999})", "max_tokens"},
        {R"({"prompt": "x", "temperature": -0.1})", "temperature"},
        {R"({"prompt": "x", "temperature": "hot"})", "temperature"},
        {R"({"prompt": "x", "top_p": 0})", "top_p"},
        {R"({"prompt": "x", "min_p": 2})", "min_p"},
        {R"({"prompt": "x", "presence_penalty": 3})", "presence_penalty"},
        {R"({"prompt": "x", "stop": 5})", "stop"},
        {R"({"prompt": "x", "stop": [""]})", "stop"},
        {R"({"prompt": "x", "stop": ["a", 1]})", "stop"},
        {R"({"prompt": "x", "seed": "s"})", "seed"},
        {R"({"prompt": "x", "n": 2})", "n"},
        {R"({"prompt": "x", "best_of": 3})", "best_of"},
        {R"({"prompt": "x", "echo": true})", "echo"},
        {R"({"prompt": "x", "suffix": "s"})", "suffix"},
        {R"({"prompt": "x", "logit_bias": {"5": 1}})", "logit_bias"},
        {R"({"prompt": "x", "logprobs": 21})", "logprobs"},
        {R"({"prompt": "x", "stream": "yes"})", "stream"},
        {R"({"prompt": "x", "stream_options": {"include_usage": true}})", "stream_options"},
        {R"({"prompt": "x", "model": 3})", "model"},
        {R"({"prompt": "x", "user": 3})", "user"},
        {R"({"prompt": ["a", "b"]})", "prompt"},
        {R"({"prompt": [1, -2]})", "prompt"},
        {R"({"prompt": []})", "prompt"},
        {R"({"prompt": 5})", "prompt"},
        {R"({"max_tokens": 5})", "prompt"},
    };
    for (const auto& c : cases) {
        const api_error e = refused(c.body);
        EXPECT_EQ(e.http_status, 400) << c.body;
        EXPECT_EQ(e.param, c.param) << c.body << " -> " << e.message;
        EXPECT_NE(e.message.find(c.param), std::string::npos) << c.body << " -> " << e.message;
    }
    const bad_case chat[] = {
        {R"({"messages": []})", "messages"},
        {R"({"messages": "hi"})", "messages"},
        {R"({"messages": [{"content": "x"}]})", "messages[0]"},
        {R"({"messages": [{"role": "wizard", "content": "x"}]})", "messages[0].role"},
        {R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content"},
        {R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", "messages[0].content"},
        {R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", "top_logprobs"},
        {R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})", "tools"},
        {R"({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1})", "max_completion_tokens"},
    };
    for (const auto& c : chat) EXPECT_EQ(refused(c.body, api_kind::API_CHAT).param, c.param) << c.body;
}

TEST(ServeApi, MalformedBodies) {
    for (const char* body : {"", "{", "{\"prompt\": \"x\",}", "[1, 2]", "\"text\"", "null", "\xff\xfe"}) {
        const api_error e = refused(body);
        EXPECT_EQ(e.http_status, 400) << body;
        EXPECT_FALSE(e.message.empty());
    }
    EXPECT_NE(refused("{").message.find("not valid JSON"), std::string::npos);
    // Deep nesting: parsed and freed without a stack overflow, refused as not an object.
    EXPECT_EQ(refused(std::string(200000, '[') + std::string(200000, ']')).http_status, 400);
    EXPECT_EQ(refused("{\"prompt\": " + std::string(200000, '[') + std::string(200000, ']') + "}").param, "prompt");
}

TEST(ServeApi, ErrorShape) {
    const auto j =
        json::parse(api_error_json({404, "no model", "invalid_request_error", "model", "model_not_found"}).dump());
    EXPECT_EQ(j["error"]["message"], "no model");
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_EQ(j["error"]["param"], "model");
    EXPECT_EQ(j["error"]["code"], "model_not_found");
    const auto k = json::parse(api_error_json({400, "m", "invalid_request_error", "", ""}).dump());
    EXPECT_TRUE(k["error"]["param"].is_null());
    EXPECT_TRUE(k["error"]["code"].is_null());
}

TEST(ServeApi, ResponseAndChunkShapes) {
    const api_request       comp = ok(R"({"prompt": "x", "logprobs": 1})");
    const api_response_head h{"cmpl-1", 123, "tiny"};
    api_token               t;
    t.lp.id      = 5;
    t.lp.logprob = -0.25f;
    t.text       = " hi";
    t.top        = {{" hi", -0.25f}};
    const std::vector<api_token> lps{t};
    const auto                   r = json::parse(api_response_json(comp, h, " hi", "length", {3, 1}, &lps).dump());
    EXPECT_EQ(r["object"], "text_completion");
    EXPECT_EQ(r["choices"][0]["text"], " hi");
    EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(r["choices"][0]["logprobs"]["tokens"][0], " hi");
    EXPECT_FLOAT_EQ(r["choices"][0]["logprobs"]["token_logprobs"][0].get<float>(), -0.25f);
    EXPECT_EQ(r["choices"][0]["logprobs"]["text_offset"][0], 0);
    EXPECT_EQ(r["usage"]["total_tokens"], 4);

    api_request chat  = ok(R"({"messages": [{"role": "user", "content": "x"}], "stream": true,
                             "stream_options": {"include_usage": true}})",
                           api_kind::API_CHAT);
    const auto  first = json::parse(api_chunk_json(chat, h, "", std::nullopt, true, nullptr).dump());
    EXPECT_EQ(first["object"], "chat.completion.chunk");
    EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
    EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
    EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
    const auto last = json::parse(api_chunk_json(chat, h, "", std::string("stop"), false, nullptr).dump());
    EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
    EXPECT_TRUE(last["choices"][0]["delta"].empty());
    const auto usage = json::parse(api_usage_chunk_json(chat, h, {4, 2}).dump());
    EXPECT_TRUE(usage["choices"].empty());
    EXPECT_EQ(usage["usage"]["completion_tokens"], 2);
    const auto full = json::parse(api_response_json(chat, h, "ok", "stop", {4, 2}, nullptr).dump());
    EXPECT_EQ(full["choices"][0]["message"]["content"], "ok");
    EXPECT_TRUE(full["choices"][0]["logprobs"].is_null());
}

}  // namespace
}  // namespace gptq
