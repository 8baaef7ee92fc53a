// Generation: greedy decoding against transformers' generate() token for token (64 tokens; FP16
// tiny-llama and small-llama, and the RTN GPTQ checkpoint of tiny-llama made here by
// `gptq quantize --method rtn`, which transformers ran dequantized; tests/data/generate/goldens.json
// from scripts/device/make_generate_goldens.sh), seeded sampling, batched == one-by-one, stop
// strings, UTF-8-safe streaming, and the CLI end to end including bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "gptq/generate.h"
#include "test_util.h"

namespace gptq {
namespace {

const std::string k_tiny = test::source_path("models/tiny-llama");

// Opened once per model for the whole test program (loading converts every weight to F32).
// exact: GPTQ linears with F32 activations, as the transformers goldens compute (int8-rounded
// ones, the default, move logits by about their rounding, enough to flip a near-tie; the
// kernels' bounds are test_cpu_int4_gemv's).
generator& model_generator(const std::string& path, bool exact = true) {
    static std::map<std::string, std::unique_ptr<generator>> cache;
    auto&                                                    g = cache[path + (exact ? "" : "#int8")];
    if (!g) {
        generator_options o;
        o.model_path        = path;
        o.exact_activations = exact;
        auto r              = generator::open(o);
        if (!r) ADD_FAILURE() << r.error().message();
        g = std::move(*r);
    }
    return *g;
}

generate_params greedy_params(int64_t n) {
    generate_params p;
    p.max_new_tokens              = n;
    p.sampling.temperature        = 0.0f;
    p.sampling.repetition_penalty = 1.0f;
    return p;
}

// Sampling with every filter on (the sampler's defaults are greedy, as transformers').
sampling_params hot_sampling() {
    sampling_params s;
    s.do_sample          = true;
    s.temperature        = 0.7f;
    s.top_k              = 40;
    s.top_p              = 0.9f;
    s.repetition_penalty = 1.1f;
    return s;
}

// The RTN checkpoint of tiny-llama, made once (RTN is deterministic: the goldens were computed from
// the same command's output).
std::string rtn_checkpoint() {
    static test::temp_dir dir("generate-rtn");
    static std::string    path;
    if (path.empty()) {
        path   = dir.file("tiny-llama-rtn");
        auto r = test::run_command(test::gptq_binary() + " -q quantize " + k_tiny + " -o " + path + " --method rtn");
        EXPECT_EQ(r.exit_code, 0) << r.err;
    }
    return path;
}

bool utf8_valid(const std::string& s) {
    size_t i = 0;
    while (i < s.size()) {
        const auto c = static_cast<unsigned char>(s[i]);
        size_t     n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (n == 0 || i + n > s.size()) return false;
        for (size_t k = 1; k < n; ++k)
            if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
        i += n;
    }
    return true;
}

TEST(Generate, GreedyMatchesTransformers) {
    const auto goldens = nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/goldens.json")));
    int        n_checked = 0;
    for (const auto& c : goldens["cases"]) {
        const std::string name = c["model"];
        std::string       path;
        if (name == "tiny-llama") {
            path = k_tiny;
        } else if (name == "tiny-llama-gptq-rtn") {
            path = rtn_checkpoint();
        } else if (name == "small-llama") {
            if (!test::shared_available()) continue;  // reported below
#ifdef GPTQ_SANITIZE
            continue;  // the 23M-parameter model is too slow under ASan; the release run covers it
#endif
            path = test::shared_path("models/small-llama");
        } else {
            FAIL() << "unknown model " << name;
        }
        generate_params p             = greedy_params(c["max_new_tokens"]);
        p.ignore_eos                  = c["ignore_eos"];
        p.sampling.repetition_penalty = c["repetition_penalty"];
        const std::string prompt      = c["prompt"];
        auto              r           = model_generator(path).generate(prompt, p);
        ASSERT_TRUE(r.is_ok()) << r.error().message();
        const std::string what = name + " '" + prompt + "' ignore_eos " + (p.ignore_eos ? "1" : "0") +
                                 " repetition_penalty " + std::to_string(p.sampling.repetition_penalty);
        ASSERT_EQ(r->prompt_tokens, c["prompt_ids"].get<std::vector<int32_t>>()) << what;
        const auto want = c["tokens"].get<std::vector<int32_t>>();
        ASSERT_EQ(r->tokens.size(), want.size()) << what;
        for (size_t i = 0; i < want.size(); ++i)
            ASSERT_EQ(r->tokens[i], want[i])
                << what << ": first difference at generated token " << i
                << " (smallest top-2 logit margin in transformers' run: " << c["min_margin"].get<double>() << ")";
        EXPECT_EQ(r->text, c["text"].get<std::string>()) << what;
        ++n_checked;
    }
    EXPECT_GE(n_checked, 18);
    if (!test::shared_available()) std::printf("note: ../shared absent: small-llama goldens skipped\n");
}

TEST(Generate, SamplingIsReproducibleWithASeed) {
    generator&      g = model_generator(k_tiny);
    generate_params p;
    p.sampling       = hot_sampling();
    p.max_new_tokens = 32;
    p.ignore_eos     = true;
    p.sampling.seed  = 1234;
    auto a           = g.generate("Once upon a time", p);
    auto b           = g.generate("Once upon a time", p);
    p.sampling.seed  = 99;
    auto c           = g.generate("Once upon a time", p);
    ASSERT_TRUE(a && b && c);
    EXPECT_EQ(a->tokens, b->tokens);
    EXPECT_EQ(a->text, b->text);
    EXPECT_NE(a->tokens, c->tokens) << "32 sampled tokens identical under two seeds";
    // Greedy does not depend on the seed at all.
    generate_params gp = greedy_params(16);
    gp.sampling.seed   = 7;
    auto g1            = g.generate("Once upon a time", gp);
    gp.sampling.seed   = 8;
    auto g2            = g.generate("Once upon a time", gp);
    ASSERT_TRUE(g1 && g2);
    EXPECT_EQ(g1->tokens, g2->tokens);
}

// A GPTQ checkpoint with the default int8-rounded activations: every row of a step multiplies the
// same rounded activations (decode GEMV or prompt sgemm), so a sequence's tokens do not depend on
// the batch it runs in.
TEST(Generate, Int8ActivationsBatchedEqualsOneByOne) {
    generator&                     g       = model_generator(rtn_checkpoint(), /*exact=*/false);
    const std::vector<std::string> prompts = {"The history of the city", "A", "Once upon a time, there was a",
                                              "def fibonacci(n):", "The history of the city"};
    generate_params                p       = greedy_params(24);
    auto                           batch   = g.generate_batch(prompts, p);
    ASSERT_TRUE(batch.is_ok()) << batch.error().message();
    for (size_t i = 0; i < prompts.size(); ++i) {
        auto one = g.generate(prompts[i], p);
        ASSERT_TRUE(one.is_ok());
        EXPECT_EQ((*batch)[i].tokens, one->tokens) << "prompt " << i;
    }
}

TEST(Generate, BatchedEqualsOneByOne) {
    generator&                     g       = model_generator(k_tiny);
    const std::vector<std::string> prompts = {"The history of the city", "A", "Once upon a time, there was a",
                                              "def fibonacci(n):", "The history of the city"};
    for (const bool sample : {false, true}) {
        generate_params p = greedy_params(24);
        if (sample) {
            p.sampling      = hot_sampling();
            p.sampling.seed = 5;
        }
        p.stop = {"\n\n"};  // may end some sequences early, so the batch shrinks
        generate_stats st;
        auto           batch = g.generate_batch(prompts, p, &st);
        ASSERT_TRUE(batch.is_ok()) << batch.error().message();
        ASSERT_EQ(batch->size(), prompts.size());
        EXPECT_EQ(st.n_sequences, 5);
        int64_t n_prompt = 0;
        for (size_t i = 0; i < prompts.size(); ++i) {
            auto one = g.generate(prompts[i], p);
            ASSERT_TRUE(one.is_ok());
            EXPECT_EQ((*batch)[i].prompt, prompts[i]);
            EXPECT_EQ((*batch)[i].tokens, one->tokens) << "prompt " << i << (sample ? " (sampled)" : " (greedy)");
            EXPECT_EQ((*batch)[i].text, one->text);
            EXPECT_EQ((*batch)[i].finish_reason, one->finish_reason);
            n_prompt += static_cast<int64_t>(one->prompt_tokens.size());
        }
        EXPECT_EQ(st.n_prefill_tokens, n_prompt);
        EXPECT_GT(st.n_decode_tokens, 0);
    }
}

TEST(Generate, StopStringsEndTheTextBeforeThem) {
    generator& g    = model_generator(k_tiny);
    auto       full = g.generate("The history of the city", [] {
        generate_params p = greedy_params(40);
        p.ignore_eos      = true;
        return p;
    }());
    ASSERT_TRUE(full.is_ok());
    const std::string& t = full->text;
    ASSERT_GT(t.size(), 40u);
    // Stops that span token boundaries, at several places, and one that never occurs.
    for (size_t at : {size_t{3}, t.size() / 2, t.size() - 9}) {
        const std::string stop = t.substr(at, 7);
        generate_params   p    = greedy_params(40);
        p.ignore_eos           = true;
        p.stop                 = {"never-in-the-text", stop};
        std::string streamed;
        auto        r = g.generate("The history of the city", p, [&](const std::string& s) { streamed += s; });
        ASSERT_TRUE(r.is_ok());
        EXPECT_EQ(r->text, t.substr(0, t.find(stop))) << "stop '" << stop << "'";
        EXPECT_EQ(streamed, r->text);
        EXPECT_EQ(r->finish_reason, "stop");
        EXPECT_LT(r->tokens.size(), full->tokens.size());
    }
    generate_params p = greedy_params(40);
    p.ignore_eos      = true;
    p.stop            = {"never-in-the-text"};
    auto r            = g.generate("The history of the city", p);
    ASSERT_TRUE(r.is_ok());
    EXPECT_EQ(r->text, t);
    EXPECT_EQ(r->finish_reason, "length");
}

TEST(Generate, StreamingNeverEmitsBrokenUtf8) {
    // Hot sampling over the whole vocabulary picks byte-fallback tokens (<0xE2>, ...) often, so
    // multi-byte characters arrive split over tokens and invalid byte runs occur.
    generator& g           = model_generator(k_tiny);
    int        n_multibyte = 0;
    for (uint64_t seed = 1; seed <= 6; ++seed) {
        generate_params p;
        p.max_new_tokens              = 96;
        p.ignore_eos                  = true;
        p.sampling.do_sample          = true;
        p.sampling.temperature        = 3.0f;
        p.sampling.top_k              = 0;
        p.sampling.top_p              = 1.0f;
        p.sampling.repetition_penalty = 1.0f;
        p.sampling.seed               = seed;
        if (seed % 2) p.stop = {"\xE2\x82\xAC\xE2\x82\xAC"};  // exercise the hold-back too
        std::vector<std::string> pieces;
        auto                     r = g.generate("\xE2\x82\xAC 5 \xF0\x9F\x98\x80 caf\xC3\xA9", p,
                                                [&](const std::string& s) { pieces.push_back(s); });
        ASSERT_TRUE(r.is_ok());
        std::string joined;
        for (const auto& s : pieces) {
            EXPECT_TRUE(utf8_valid(s)) << "seed " << seed << ": streamed piece is not valid UTF-8";
            joined += s;
        }
        EXPECT_EQ(joined, r->text);
        for (unsigned char ch : r->text) n_multibyte += ch >= 0x80;
    }
    EXPECT_GT(n_multibyte, 0) << "no multi-byte text was generated: the test exercised nothing";
}

TEST(Generate, BadParametersAreErrors) {
    generator& g   = model_generator(k_tiny);
    auto       bad = [&](auto edit, const char* needle) {
        generate_params p = greedy_params(4);
        edit(p);
        auto r = g.generate("x", p);
        ASSERT_FALSE(r.is_ok()) << needle;
        EXPECT_NE(r.error().message().find(needle), std::string::npos) << r.error().message();
    };
    bad([](generate_params& p) { p.max_new_tokens = -1; }, "--max-new-tokens is -1");
    bad([](generate_params& p) { p.sampling.temperature = -0.5f; }, "--temperature is -0.5");
    bad([](generate_params& p) { p.sampling.top_p = 0.0f; }, "--top-p is 0");
    bad([](generate_params& p) { p.sampling.min_p = 2.0f; }, "--min-p is 2");
    bad([](generate_params& p) { p.sampling.top_k = -3; }, "--top-k is -3");
    bad([](generate_params& p) { p.sampling.repetition_penalty = 0.0f; }, "--repetition-penalty is 0");
    bad([](generate_params& p) { p.stop = {""}; }, "empty stop string");
    generator_options o;
    o.model_path = k_tiny;
    o.device     = "cuda:x";  // --device cuda itself: tests/unit/test_device.cpp, cuda/test_llama_cuda.cpp
    auto r       = generator::open(o);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("'cuda:x'"), std::string::npos) << r.error().message();
}

// ---- CLI -----------------------------------------------------------------------------------------

std::string gen_cmd(const std::string& args) {
    return test::gptq_binary() + " generate " + args;
}

TEST(GenerateCli, StreamsTheGreedyGoldenText) {
    const auto  goldens = nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/goldens.json")));
    const auto& c       = goldens["cases"][0];  // tiny-llama, ignore_eos, no penalty
    ASSERT_EQ(c["model"], "tiny-llama");
    auto r = test::run_command(gen_cmd(k_tiny + " -p '" + c["prompt"].get<std::string>() +
                                       "' -n 64 --temperature 0 --repetition-penalty 1 --ignore-eos --threads 2"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, c["text"].get<std::string>() + "\n");
    EXPECT_NE(r.err.find("tokens/s"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("finish: length"), std::string::npos) << r.err;
}

TEST(GenerateCli, RepeatedStopOptionsTakeOneValueEach) {
    const auto  goldens = nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/goldens.json")));
    const auto& c       = goldens["cases"][0];
    const std::string text = c["text"];
    const std::string stop = text.substr(text.size() / 3, 6);
    // Options before the positional model: a --stop that swallowed extra words would eat it.
    auto r = test::run_command(gen_cmd("--stop '" + stop + "' --stop never-there " + k_tiny + " -p '" +
                                       c["prompt"].get<std::string>() +
                                       "' -n 64 --temperature 0 --repetition-penalty 1 --ignore-eos"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, text.substr(0, text.find(stop)) + "\n");
    EXPECT_NE(r.err.find("finish: stop"), std::string::npos) << r.err;
}

TEST(GenerateCli, PromptsFileIsOneBatchOfJsonLines) {
    test::temp_dir dir("generate-cli");
    test::write_file(dir.file("p.txt"), "The history of the city\n\nOnce upon a time\n");
    test::write_file(dir.file("p.jsonl"),
                     "{\"prompt\": \"The history of the city\"}\n{\"prompt\": \"Once upon a time\"}\n");
    const std::string opts = " -n 12 --temperature 0 --repetition-penalty 1";
    auto              a    = test::run_command(gen_cmd(k_tiny + " --prompts " + dir.file("p.txt") + opts));
    auto              b =
        test::run_command(gen_cmd(k_tiny + " --prompts " + dir.file("p.jsonl") + opts + " -o " + dir.file("o.jsonl")));
    ASSERT_EQ(a.exit_code, 0) << a.err;
    ASSERT_EQ(b.exit_code, 0) << b.err;
    EXPECT_EQ(a.out, test::read_file(dir.file("o.jsonl")));
    std::vector<nlohmann::json> lines;
    size_t                      pos = 0, nl;
    while ((nl = a.out.find('\n', pos)) != std::string::npos) {
        lines.push_back(nlohmann::json::parse(a.out.substr(pos, nl - pos)));
        pos = nl + 1;
    }
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[1]["prompt"], "Once upon a time");
    auto one = model_generator(k_tiny).generate("Once upon a time", greedy_params(12));
    ASSERT_TRUE(one.is_ok());
    EXPECT_EQ(lines[1]["tokens"].get<std::vector<int32_t>>(), one->tokens);
    EXPECT_EQ(lines[1]["text"], one->text);
    EXPECT_NE(a.err.find("2 sequences"), std::string::npos) << a.err;
}

TEST(GenerateCli, ChatUsesTheModelTemplate) {
    // tiny-llama has no chat template: a copy of its folder gets the Llama-2 one.
    test::temp_dir    dir("generate-chat");
    const std::string model = dir.file("m");
    std::filesystem::create_directories(model);
    for (const auto& e : std::filesystem::directory_iterator(k_tiny)) {
        const auto dst = std::filesystem::path(model) / e.path().filename();
        if (e.path().extension() == ".safetensors")
            std::filesystem::create_symlink(e.path(), dst);
        else if (e.path().filename() != "tokenizer_config.json")
            std::filesystem::copy_file(e.path(), dst);
    }
    auto       cfg = nlohmann::json::parse(test::read_file(k_tiny + "/tokenizer_config.json"));
    const auto templates =
        nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/chat_templates.json")));
    for (const auto& t : templates["templates"])
        if (t["name"] == "llama-2") cfg["chat_template"] = t["template"];
    ASSERT_TRUE(cfg.contains("chat_template"));
    test::write_file(model + "/tokenizer_config.json", cfg.dump());

    auto none = test::run_command(gen_cmd(k_tiny + " --chat -p hi -n 4"));
    EXPECT_EQ(none.exit_code, 1);
    EXPECT_NE(none.err.find("no chat template"), std::string::npos) << none.err;

    const std::string opts = " -n 8 --temperature 0 --repetition-penalty 1 --ignore-eos";
    auto              one  = test::run_command(gen_cmd(model + " --chat -p 'Hello there'" + opts));
    ASSERT_EQ(one.exit_code, 0) << one.err;
    // The same text as a plain prompt with the rendered template (BOS comes from the template).
    auto rendered = model_generator(model).chat_render({{"user", "Hello there"}}, true);
    ASSERT_TRUE(rendered.is_ok()) << rendered.error().message();
    EXPECT_EQ(*rendered, "<s>[INST] Hello there [/INST]");
    generate_params p = greedy_params(8);
    p.ignore_eos      = true;
    p.add_special     = false;
    auto direct       = model_generator(model).generate(*rendered, p);
    ASSERT_TRUE(direct.is_ok());
    EXPECT_EQ(direct->prompt_tokens.front(), 1) << "BOS from the template";
    EXPECT_NE(direct->prompt_tokens.at(1), 1) << "BOS twice";
    EXPECT_EQ(one.out, direct->text + "\n");
    // Turns from a pipe (not a terminal): one answer line per user line, history kept.
    auto turns = test::run_command("printf 'Hello there\\nAnd then?\\n' | " + gen_cmd(model + " --chat" + opts));
    ASSERT_EQ(turns.exit_code, 0) << turns.err;
    EXPECT_EQ(turns.out.substr(0, one.out.size()), one.out);
    EXPECT_GT(turns.out.size(), one.out.size());
}

TEST(GenerateCli, BadInputExitsOneWithOneLine) {
    test::temp_dir dir("generate-bad");
    test::write_file(dir.file("bad.jsonl"), "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt key\"}\n");
    test::write_file(dir.file("empty.txt"), "\n\n");
    const std::vector<std::pair<std::string, std::string>> cases = {
        {dir.file("nope") + " -p hi", "nope"},
        {k_tiny + " -p hi --device cuda:x", "--device 'cuda:x'"},
        {k_tiny + " -p hi --device tpu", "--device 'tpu'"},
        {k_tiny + " -p hi --top-p 0", "--top-p is 0"},
        {k_tiny + " -p hi --temperature -1", "--temperature is -1"},
        {k_tiny + " -p hi -n -5", "--max-new-tokens is -5"},
        {k_tiny, "nothing to generate from"},
        {k_tiny + " -p hi --prompts " + dir.file("bad.jsonl"), "not both"},
        {k_tiny + " --prompts " + dir.file("missing.txt"), "missing.txt: cannot open"},
        {k_tiny + " --prompts " + dir.file("bad.jsonl"), "bad.jsonl:2: expected an object with a string \"prompt\""},
        {k_tiny + " --prompts " + dir.file("empty.txt"), "no prompts"},
        {k_tiny + " -p hi --stop ''", "empty stop string"},
    };
    for (const auto& [args, needle] : cases) {
        auto r = test::run_command(gen_cmd(args));
        EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << "\n" << r.err;
        EXPECT_EQ(r.err.rfind("gptq: error: ", 0), 0u) << r.err;
        EXPECT_NE(r.err.find(needle), std::string::npos) << args << "\n" << r.err;
        EXPECT_TRUE(r.out.empty()) << args << "\n" << r.out;
    }
}

}  // namespace
}  // namespace gptq

namespace gptq {
namespace {

// ---- defaults from generation_config.json, context limit (issue 15) --------------------------------

// A copy of the bundled tiny-llama (weights linked) whose generation_config.json / config.json
// get `gen_extra` / `cfg_extra` merged in; kept for the whole test program.
std::string tiny_variant(const std::string& tag, const nlohmann::json& gen_extra,
                         const nlohmann::json& cfg_extra = nlohmann::json::object()) {
    static std::vector<std::unique_ptr<test::temp_dir>> dirs;
    dirs.push_back(std::make_unique<test::temp_dir>("gen-variant-" + tag));
    const std::string dir = dirs.back()->path();
    for (const auto& e : std::filesystem::directory_iterator(k_tiny)) {
        const auto dst = std::filesystem::path(dir) / e.path().filename();
        if (e.path().extension() == ".safetensors")
            std::filesystem::create_symlink(e.path(), dst);
        else
            std::filesystem::copy_file(e.path(), dst);
    }
    for (const auto& [file, extra] :
         {std::pair{"generation_config.json", gen_extra}, std::pair{"config.json", cfg_extra}}) {
        auto j = nlohmann::json::parse(test::read_file(dir + "/" + file));
        j.update(extra);
        test::write_file(dir + "/" + file, j.dump(1));
    }
    return dir;
}

std::vector<nlohmann::json> json_lines(const std::string& text) {
    std::vector<nlohmann::json> out;
    size_t                      pos = 0, nl;
    while ((nl = text.find('\n', pos)) != std::string::npos) {
        out.push_back(nlohmann::json::parse(text.substr(pos, nl - pos)));
        pos = nl + 1;
    }
    return out;
}

// `gptq generate MODEL --prompts FILE EXTRA`: the JSON line of each prompt (stderr checked by the caller).
test::run_result generate_prompts(const std::string& model, const std::vector<std::string>& prompts,
                                  const std::string& extra = "") {
    static int     n = 0;
    test::temp_dir dir("gen-prompts-" + std::to_string(n++));
    std::string    text;
    for (const auto& p : prompts) text += p + "\n";
    test::write_file(dir.file("p.txt"), text);
    return test::run_command(gen_cmd(model + " --prompts " + dir.file("p.txt") + " --threads 2" + extra));
}

// `gptq generate` with no decoding flag at all against transformers' generate() given nothing but
// the prompt (tests/data/generate/defaults.json, scripts/make_generate_default_goldens.py): the
// plain models (transformers' unset length, 20 new tokens: a prefix of our 200; and its
// max_new_tokens=200: every token) and tiny-llama copies whose generation_config.json sets a
// repetition penalty, a list of EOS ids, max_new_tokens, max_length, or sampling keys without
// do_sample (still greedy).
TEST(GenerateCli, DefaultFlagsMatchTransformersDefaultGenerate) {
    const auto goldens = nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/defaults.json")));
    const int64_t n_default = goldens["n_default"];
    EXPECT_EQ(generate_params{}.max_new_tokens, n_default);
    std::map<std::string, std::vector<nlohmann::json>> by_model;
    for (const auto& c : goldens["cases"]) by_model[c["model"]].push_back(c);
    int n_checked = 0;
    for (const auto& [name, cases] : by_model) {
        std::string path;
        if (name == "tiny-llama") {
            path = k_tiny;
        } else if (name == "small-llama") {
            if (!test::shared_available()) continue;
#ifdef GPTQ_SANITIZE
            continue;  // too slow under ASan; the release run covers it
#endif
            path = test::shared_path("models/small-llama");
        } else {
            ASSERT_EQ(name.rfind("tiny-llama+", 0), 0u) << name;
            path = tiny_variant(name.substr(11), cases[0]["generation_config"]);
        }
        std::vector<std::string> prompts;
        for (const auto& c : cases)
            if (std::find(prompts.begin(), prompts.end(), c["prompt"]) == prompts.end()) prompts.push_back(c["prompt"]);
        const auto r = generate_prompts(path, prompts);
        ASSERT_EQ(r.exit_code, 0) << name << "\n" << r.err;
        // One settings line: greedy, from the model's generation_config.json.
        EXPECT_NE(r.err.find("generation: greedy, repetition_penalty "), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("generation_config.json; flags override)"), std::string::npos) << r.err;
        const auto lines = json_lines(r.out);
        ASSERT_EQ(lines.size(), prompts.size()) << r.out;
        for (const auto& c : cases) {
            const size_t      i    = std::find(prompts.begin(), prompts.end(), c["prompt"]) - prompts.begin();
            const auto&       got  = lines[i];
            const auto        want = c["tokens"].get<std::vector<int32_t>>();
            const auto        ours = got["tokens"].get<std::vector<int32_t>>();
            const std::string what = name + " " + c["call"].get<std::string>() + " '" + c["prompt"].get<std::string>() +
                                     "' (smallest top-2 margin in transformers' run " +
                                     std::to_string(c["min_margin"].get<double>()) + ")";
            ASSERT_EQ(got["n_prompt_tokens"], c["prompt_ids"].size()) << what;
            if (c["call"] == "generate()" && !c.contains("generation_config")) {
                // transformers' unset length: 20 new tokens, the first of our 200.
                ASSERT_EQ(want.size(), 20u) << what;
                ASSERT_GE(ours.size(), want.size()) << what;
                EXPECT_EQ(std::vector<int32_t>(ours.begin(), ours.begin() + want.size()), want) << what;
            } else {
                EXPECT_EQ(ours, want) << what;
                EXPECT_EQ(got["text"], c["text"]) << what;
            }
            ++n_checked;
        }
    }
    EXPECT_GE(n_checked, 21);
}

// Only the flags given override the model's defaults; do_sample in generation_config.json samples
// with its temperature / top_p and transformers' top_k 50; --temperature 0 is greedy again; EOS
// ids and lengths come from the file.
TEST(GenerateCli, FlagsOverrideOnlyWhatTheyName) {
    const auto goldens = nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/defaults.json")));
    std::map<std::string, std::vector<int32_t>> golden;  // "model|call|prompt" -> tokens
    for (const auto& c : goldens["cases"])
        golden[c["model"].get<std::string>() + "|" + c["call"].get<std::string>() + "|" +
               c["prompt"].get<std::string>()] = c["tokens"].get<std::vector<int32_t>>();
    const std::string prompt = "The history of the city";
    const std::string call   = "generate(max_new_tokens=200)";

    // generation_config.json: repetition_penalty 1.3; --repetition-penalty 1 brings the plain golden.
    const std::string rp = tiny_variant("rp-flag", {{"repetition_penalty", 1.3}});
    auto              a  = generate_prompts(rp, {prompt}, " --repetition-penalty 1");
    ASSERT_EQ(a.exit_code, 0) << a.err;
    EXPECT_EQ(json_lines(a.out).at(0)["tokens"].get<std::vector<int32_t>>(),
              golden.at("tiny-llama|" + call + "|" + prompt));
    // ... and -n 5 keeps the file's penalty: the first 5 tokens of its golden.
    auto b = generate_prompts(rp, {prompt}, " -n 5");
    ASSERT_EQ(b.exit_code, 0) << b.err;
    const auto rp_golden = golden.at("tiny-llama+repetition-penalty|" + call + "|" + prompt);
    EXPECT_EQ(json_lines(b.out).at(0)["tokens"].get<std::vector<int32_t>>(),
              std::vector<int32_t>(rp_golden.begin(), rp_golden.begin() + 5));
    EXPECT_NE(b.err.find("repetition_penalty 1.3, max_new_tokens 5"), std::string::npos) << b.err;

    // do_sample in the file: sampling with its temperature and top_p, top_k 50 (transformers'
    // default), seed 0 -- the library call with those parameters gives the same tokens.
    const std::string smp = tiny_variant("sample", {{"do_sample", true}, {"temperature", 0.8}, {"top_p", 0.9}});
    auto              s   = generate_prompts(smp, {prompt}, " -n 24 --ignore-eos");
    ASSERT_EQ(s.exit_code, 0) << s.err;
    EXPECT_NE(s.err.find("generation: sampling (temperature 0.8, top_k 50, top_p 0.9, min_p 0, seed 0)"),
              std::string::npos)
        << s.err;
    generate_params p;
    p.max_new_tokens       = 24;
    p.ignore_eos           = true;
    p.sampling.do_sample   = true;
    p.sampling.temperature = 0.8f;
    p.sampling.top_p       = 0.9f;
    auto direct            = model_generator(k_tiny).generate(prompt, p);
    ASSERT_TRUE(direct.is_ok());
    const auto sampled = json_lines(s.out).at(0)["tokens"].get<std::vector<int32_t>>();
    EXPECT_EQ(sampled, direct->tokens);
    const auto& greedy_golden = golden.at("tiny-llama|" + call + "|" + prompt);
    EXPECT_NE(sampled, std::vector<int32_t>(greedy_golden.begin(), greedy_golden.begin() + 24));
    auto g = generate_prompts(smp, {prompt}, " --temperature 0");
    ASSERT_EQ(g.exit_code, 0) << g.err;
    EXPECT_EQ(json_lines(g.out).at(0)["tokens"].get<std::vector<int32_t>>(), greedy_golden);
    // The library's own defaults for that folder.
    auto gen = generator::open({.model_path = smp});
    ASSERT_TRUE(gen.is_ok()) << gen.error().message();
    const generate_params& d = (*gen)->default_params();
    EXPECT_TRUE(d.sampling.do_sample);
    EXPECT_FLOAT_EQ(d.sampling.temperature, 0.8f);
    EXPECT_EQ(d.sampling.top_k, 50);
    EXPECT_FLOAT_EQ(d.sampling.top_p, 0.9f);
    EXPECT_FLOAT_EQ(d.sampling.repetition_penalty, 1.0f);
    EXPECT_EQ(d.max_new_tokens, 200);
    EXPECT_EQ((*gen)->eos_ids(), std::vector<int32_t>{2});

    // Greedy model + --top-k alone: a warning that it does nothing, greedy output.
    auto k = generate_prompts(k_tiny, {prompt}, " --top-k 5");
    ASSERT_EQ(k.exit_code, 0) << k.err;
    EXPECT_NE(k.err.find("warning: --top-k, --top-p and --min-p have no effect with greedy decoding"),
              std::string::npos)
        << k.err;
    EXPECT_EQ(json_lines(k.out).at(0)["tokens"].get<std::vector<int32_t>>(), greedy_golden);

    // max_length in the file counts the prompt; -n replaces it (transformers: max_new_tokens wins).
    const std::string ml = tiny_variant("ml-flag", {{"max_length", 12}});
    auto              m  = generate_prompts(ml, {prompt}, " -n 9");
    ASSERT_EQ(m.exit_code, 0) << m.err;
    EXPECT_EQ(json_lines(m.out).at(0)["tokens"].get<std::vector<int32_t>>(),
              std::vector<int32_t>(greedy_golden.begin(), greedy_golden.begin() + 9));
    // A prompt as long as max_length: an error saying to pass -n (transformers refuses it too).
    auto too_long = generate_prompts(ml, {"The history of the city is a new system. The history"});
    EXPECT_EQ(too_long.exit_code, 1);
    EXPECT_NE(too_long.err.find("max_length is 12 (prompt included"), std::string::npos) << too_long.err;

    // A broken value in generation_config.json: an error naming the file and key.
    const std::string bad = tiny_variant("bad-gen", {{"repetition_penalty", -1}});
    auto              e   = test::run_command(gen_cmd(bad + " -p hi"));
    EXPECT_EQ(e.exit_code, 1);
    EXPECT_NE(e.err.find("generation_config.json: repetition_penalty -1 must be > 0"), std::string::npos) << e.err;
}

// Prompt + -n past the context (max_position_embeddings): generation stops at the context with
// finish reason "length" and a warning; a prompt that fills the context is an error. The same
// limit sizes the GPU session's cache (generate.cpp passes each sequence's limit to
// context_reserve), which these CPU tests cannot run.
TEST(Generate, StopsAtTheModelContext) {
    const std::string ctx16 = tiny_variant("ctx16", nlohmann::json::object(), {{"max_position_embeddings", 16}});
    generator&        g     = model_generator(ctx16);
    EXPECT_EQ(g.context_length(), 16);
    const std::string prompt = "The history of the city";  // 6 tokens
    auto              full   = model_generator(k_tiny).generate(prompt, greedy_params(20));
    ASSERT_TRUE(full.is_ok());
    auto r = g.generate(prompt, greedy_params(20));
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(r->finish_reason, "length");
    ASSERT_EQ(r->tokens.size(), 10u) << "6 prompt tokens + 10 new = the 16 positions";
    EXPECT_EQ(r->tokens, std::vector<int32_t>(full->tokens.begin(), full->tokens.begin() + 10));
    // In a batch each sequence has its own room.
    auto batch = g.generate_batch({prompt, "A"}, greedy_params(12));
    ASSERT_TRUE(batch.is_ok()) << batch.error().message();
    EXPECT_EQ((*batch)[0].tokens.size(), 10u);
    EXPECT_EQ((*batch)[1].tokens.size(), 12u);
    // A prompt of 16 tokens or more leaves no room.
    auto over = g.generate("The history of the city is a new system. The history of the city", greedy_params(4));
    ASSERT_FALSE(over.is_ok());
    EXPECT_NE(over.error().message().find("the model's context is 16 positions (max_position_embeddings in "),
              std::string::npos)
        << over.error().message();

    auto cli = test::run_command(gen_cmd(ctx16 + " -p '" + prompt + "' -n 20"));
    ASSERT_EQ(cli.exit_code, 0) << cli.err;
    EXPECT_NE(cli.err.find("warning: the prompt's 6 tokens + max_new_tokens 20 exceed the model's context of 16 "
                           "positions"),
              std::string::npos)
        << cli.err;
    EXPECT_NE(cli.err.find("finish: length"), std::string::npos) << cli.err;
    EXPECT_EQ(cli.out, r->text + "\n");
    auto cli_over =
        test::run_command(gen_cmd(ctx16 + " -p 'The history of the city is a new system. The history of the city'"));
    EXPECT_EQ(cli_over.exit_code, 1);
    EXPECT_NE(cli_over.err.find("gptq: error: the prompt is 16 tokens, the model's context is 16 positions"),
              std::string::npos)
        << cli_over.err;
}

}  // namespace
}  // namespace gptq
