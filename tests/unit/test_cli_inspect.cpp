// The gptq binary end to end: inspect on the bundled model (parameter count from its
// training_info.json, --json parses), and every bad-input case gives one line and exit code 1.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "test_util.h"

using json = nlohmann::json;
using namespace gptq;

namespace {

std::string q(const std::string& s) {
    return "'" + s + "'";
}

// Copy the bundled model's small files into `dir` and link its weights, for variants.
void copy_config(const test::temp_dir& dir, const std::string& config_text) {
    test::write_file(dir.file("config.json"), config_text);
    std::filesystem::copy_file(test::source_path("models/tiny-llama/model.safetensors"), dir.file("model.safetensors"));
}

void expect_one_line_error(const test::run_result& r, const std::string& must_contain) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    ASSERT_FALSE(r.err.empty());
    EXPECT_EQ(r.err.rfind("gptq: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(must_contain), std::string::npos) << r.err;
}

}  // namespace

TEST(cli_inspect, bundled_model_parameter_count_matches_training_info) {
    auto info = json::parse(test::read_file(test::source_path("models/tiny-llama/training_info.json")));
    auto r    = test::run_command(test::gptq_binary() + " inspect --json " + test::source_path("models/tiny-llama"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = json::parse(r.out);
    EXPECT_EQ(j["n_params"].get<int64_t>(), info["params"].get<int64_t>());
    EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
    EXPECT_EQ(j["n_layers"], 4);
    EXPECT_EQ(j["hidden_size"], 256);
    EXPECT_EQ(j["vocab_size"], 8192);
    EXPECT_EQ(j["dtype"], "float16");
    EXPECT_TRUE(j["quantization"].is_null());

    auto text = test::run_command(test::gptq_binary() + " inspect --tensors " + test::source_path("models/tiny-llama"));
    ASSERT_EQ(text.exit_code, 0) << text.err;
    EXPECT_NE(text.out.find("LlamaForCausalLM"), std::string::npos);
    EXPECT_NE(text.out.find("model.layers.3.mlp.down_proj.weight"), std::string::npos);
    EXPECT_NE(text.out.find(std::to_string(info["params"].get<int64_t>())), std::string::npos);
}

TEST(cli_inspect, sharded_shared_model) {
    if (!test::shared_available()) GTEST_SKIP() << "../shared/models not present (only in CI and dev machines)";
    auto info = json::parse(test::read_file(test::shared_path("models/small-llama/training_info.json")));
    auto r    = test::run_command(test::gptq_binary() + " inspect --json " + test::shared_path("models/small-llama"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = json::parse(r.out);
    EXPECT_EQ(j["n_params"].get<int64_t>(), info["params"].get<int64_t>());
    EXPECT_EQ(j["n_files"], 4);
}

TEST(cli_inspect, gptq_checkpoint_settings_are_reported) {
    test::temp_dir dir("cli-gptq");
    // A minimal GPTQ-looking checkpoint: one quantized linear (K=64, N=32, 4-bit, g32).
    auto config                   = json::parse(test::read_file(test::source_path("models/tiny-llama/config.json")));
    config["quantization_config"] = {{"bits", 4},   {"group_size", 32},       {"desc_act", true},
                                     {"sym", true}, {"quant_method", "gptq"}, {"checkpoint_format", "gptq"}};
    test::write_file(dir.file("config.json"), config.dump());
    // The four tensors, zero-filled but for g_idx: act-order groups of 32 (a permutation of k // 32).
    json     h;
    uint64_t off = 0;
    auto     add = [&](const char* name, const char* dt, std::vector<int64_t> shape, uint64_t nb) {
        h[name] = {{"dtype", dt}, {"shape", shape}, {"data_offsets", {off, off + nb}}};
        off += nb;
    };
    add("model.layers.0.mlp.up_proj.qweight", "I32", {8, 32}, 8 * 32 * 4);
    add("model.layers.0.mlp.up_proj.qzeros", "I32", {2, 4}, 2 * 4 * 4);
    add("model.layers.0.mlp.up_proj.scales", "F16", {2, 32}, 2 * 32 * 2);
    add("model.layers.0.mlp.up_proj.g_idx", "I32", {64}, 64 * 4);
    std::string hdr = h.dump();
    hdr.resize((hdr.size() + 7) / 8 * 8, ' ');
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>((hdr.size() >> (8 * i)) & 0xff);
    std::string data(off, '\0');
    for (int k = 0; k < 64; ++k)  // little-endian int32 values 0 or 1: the low byte
        data[off - 64 * 4 + static_cast<size_t>(k) * 4] = static_cast<char>((k * 37 % 64) / 32);
    test::write_file(dir.file("model.safetensors"), bytes + hdr + data);
    auto r = test::run_command(test::gptq_binary() + " inspect --json " + dir.path());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = json::parse(r.out);
    EXPECT_EQ(j["quantization"]["bits"], 4);
    EXPECT_EQ(j["quantization"]["group_size"], 32);
    EXPECT_EQ(j["quantization"]["desc_act"], true);
    EXPECT_EQ(j["quantization"]["checkpoint_format"], "gptq");
    EXPECT_EQ(j["quantization"]["quantized_modules"], json::array({"model.layers.0.mlp.up_proj"}));
    EXPECT_EQ(j["n_params"], 64 * 32);  // logical in x out, not packed words
}

TEST(cli_inspect, bad_inputs_one_line_exit_1) {
    test::temp_dir dir("cli-bad");
    const auto     cfg_text = test::read_file(test::source_path("models/tiny-llama/config.json"));
    const auto     gptq     = test::gptq_binary();

    // Truncated safetensors.
    const auto full = test::read_file(test::source_path("models/tiny-llama/model.safetensors"));
    test::write_file(dir.file("truncated.safetensors"), full.substr(0, full.size() / 2));
    expect_one_line_error(test::run_command(gptq + " inspect " + q(dir.file("truncated.safetensors"))),
                          "truncated.safetensors");
    // Header length larger than the file.
    std::string big = full.substr(0, 64);
    big[5]          = 0x7f;
    test::write_file(dir.file("biglen.safetensors"), big);
    expect_one_line_error(test::run_command(gptq + " inspect " + q(dir.file("biglen.safetensors"))), "header length");
    // Garbage.
    const std::string garbage_header = "{\"a\": [1, 2,}   ";  // 16 bytes
    test::write_file(dir.file("garbage.safetensors"), std::string("\x10\0\0\0\0\0\0\0", 8) + garbage_header);
    expect_one_line_error(test::run_command(gptq + " inspect " + q(dir.file("garbage.safetensors"))), "not valid JSON");
    // A missing path.
    expect_one_line_error(test::run_command(gptq + " inspect " + q(dir.file("nope"))), "no such file or folder");

    // config.json without hidden_size.
    {
        test::temp_dir m("cli-nohidden");
        auto           c = json::parse(cfg_text);
        c.erase("hidden_size");
        copy_config(m, c.dump());
        expect_one_line_error(test::run_command(gptq + " inspect " + q(m.path())),
                              "missing required key 'hidden_size'");
    }
    // Unsupported architecture.
    {
        test::temp_dir m("cli-arch");
        auto           c   = json::parse(cfg_text);
        c["architectures"] = {"FalconForCausalLM"};
        copy_config(m, c.dump());
        expect_one_line_error(test::run_command(gptq + " inspect " + q(m.path())),
                              "unsupported architecture 'FalconForCausalLM'");
    }
    // Wrong JSON in config.json.
    {
        test::temp_dir m("cli-json");
        copy_config(m, "{\"architectures\": [\"LlamaForCausalLM\"");
        expect_one_line_error(test::run_command(gptq + " inspect " + q(m.path())), "config.json: invalid JSON");
    }
    // A tensor named in the index that its shard lacks.
    {
        test::temp_dir m("cli-index");
        copy_config(m, cfg_text);
        test::write_file(m.file("model.safetensors.index.json"),
                         R"({"metadata":{"total_size":1},"weight_map":{"model.norm.weight":"model.safetensors",
                            "lm_head.weight":"model.safetensors"}})");
        expect_one_line_error(test::run_command(gptq + " inspect " + q(m.path())), "'lm_head.weight'");
    }
}

TEST(cli, usage_errors_exit_2_and_help_exits_0) {
    EXPECT_EQ(test::run_command(test::gptq_binary()).exit_code, 2);
    EXPECT_EQ(test::run_command(test::gptq_binary() + " inspect").exit_code, 2);
    EXPECT_EQ(test::run_command(test::gptq_binary() + " frobnicate").exit_code, 2);
    auto help = test::run_command(test::gptq_binary() + " --help");
    EXPECT_EQ(help.exit_code, 0);
    EXPECT_NE(help.out.find("inspect"), std::string::npos);
    auto v = test::run_command(test::gptq_binary() + " --version");
    EXPECT_EQ(v.exit_code, 0);
    EXPECT_NE(v.out.find("gptqkit"), std::string::npos);
}

// Usage errors users hit first (issue 15): a misspelt command gets the nearest one, a number out
// of range or not a number names its option without echoing a huge value, a weights file given
// for a model folder says to pass the folder. One line each; exit 2 for usage, 1 for the rest.
TEST(cli, unknown_command_suggests_the_nearest) {
    const auto gptq = test::gptq_binary();
    for (const auto& [word, want] : std::vector<std::pair<std::string, std::string>>{
             {"quantise", "did you mean quantize?"},
             {"generat", "did you mean generate?"},
             {"inpsect", "did you mean inspect?"},
             {"ppll", "did you mean ppl?"},
             {"frobnicate", "the commands are inspect, tokenize, ppl, quantize, generate"}}) {
        auto r = test::run_command(gptq + " -q " + word + " models/x -o y");
        EXPECT_EQ(r.exit_code, 2) << word;
        EXPECT_EQ(r.err.rfind("gptq: error: unknown command '" + word + "'; ", 0), 0u) << r.err;
        EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    }
}

TEST(cli, bad_numbers_name_the_option_briefly) {
    const auto        gptq  = test::gptq_binary();
    const std::string model = q(test::source_path("models/tiny-llama"));
    const std::string huge(300, '9');
    struct bad_case {
        std::string args, want;
        int         exit_code;
    };
    const std::vector<bad_case> cases = {
        {"quantize " + model + " -o out --bits 99999999999999999999999",
         "--bits: '99999999999999999999999' is out of range", 2},
        {"quantize " + model + " -o out --damp-percent 1e999", "--damp-percent: '1e999' is out of range", 2},
        {"quantize " + model + " -o out --group-size " + huge,
         "--group-size: '999999999999...' (300 characters) is out of range", 2},
        {"ppl " + model + " --seqlen 1e400", "--seqlen: '1e400' is not a whole number", 2},
        {"ppl " + model + " --threads two", "--threads: 'two' is not a whole number", 2},
        {"generate " + model + " -p hi -n " + huge,
         "--max-new-tokens: '999999999999...' (300 characters) is out of range", 2},
        {"generate " + model + " -p hi --temperature 1e400", "--temperature: '1e400' is out of range", 2},
        {"generate " + model + " -p hi --temperature nan", "--temperature: 'nan' is not a finite number", 2},
        {"generate " + model + " -p hi --top-k 99999999999", "--top-k: '99999999999' is out of range", 2},
        {"generate " + model + " -p hi --seed -1", "--seed: '-1' must not be negative", 2},
        {"generate " + model + " -p hi -n -5", "-n/--max-new-tokens is -5, expected >= 0", 1},
    };
    for (const auto& c : cases) {
        auto r = test::run_command(gptq + " " + c.args);
        EXPECT_EQ(r.exit_code, c.exit_code) << c.args << "\n" << r.err;
        EXPECT_EQ(r.err.rfind("gptq: error: ", 0), 0u) << r.err;
        EXPECT_NE(r.err.find(c.want), std::string::npos) << c.args << "\n" << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
        EXPECT_LT(r.err.size(), 160u) << r.err;
        EXPECT_TRUE(r.out.empty()) << r.out;
    }
    EXPECT_FALSE(std::filesystem::exists("out"));
}

TEST(cli, a_weights_file_for_a_model_folder_says_pass_the_folder) {
    const std::string file = test::source_path("models/tiny-llama/model.safetensors");
    for (const std::string& cmd :
         {"ppl " + q(file), "generate " + q(file) + " -p hi", "quantize " + q(file) + " -o out", "bench " + q(file),
          "plan " + q(file) + " --max-memory 0=1GiB"}) {
        auto r = test::run_command(test::gptq_binary() + " " + cmd);
        expect_one_line_error(r, "model.safetensors is a file; pass the folder that holds the model");
        EXPECT_NE(r.err.find("e.g. " + test::source_path("models/tiny-llama")), std::string::npos) << r.err;
    }
}
