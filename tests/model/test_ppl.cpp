// gptq ppl (include/gptq/ppl.h and the CLI) against perplexities computed by transformers with the
// same protocol (tests/data/model/ppl.transformers.json, written by scripts/device/
// make_logit_goldens.py): window subsets always, the full WikiText-2 test split for tiny-llama.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "gptq/ppl.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

// Our logits match transformers' within ~1e-6 relative, so the mean NLL agrees to ~1e-6 and the
// ppl to ~1e-5 relative; 1e-4 leaves room for summation order and still catches any protocol slip
// (one token shifted or the last window's row scored moves the ppl by far more).
constexpr double k_ppl_rel_tol = 1e-4;

nlohmann::json goldens() {
    std::ifstream in(source_path("tests/data/model/ppl.transformers.json"));
    return nlohmann::json::parse(in);
}

void check_ppl(const std::string& model_dir, const std::string& name, int64_t seqlen, int64_t max_windows,
               const std::string& key) {
    ppl_params p;
    p.model_path  = model_dir;
    p.seqlen      = seqlen;
    p.max_windows = max_windows;
    p.n_threads   = 2;
    p.progress    = false;
    auto r        = ppl_run(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    const double want = goldens()[name][key].get<double>();
    EXPECT_NEAR(r->ppl, want, k_ppl_rel_tol * want) << name << " " << key;
    EXPECT_EQ(r->n_dataset_tokens, goldens()[name]["n_tokens"].get<int64_t>());
    EXPECT_EQ(r->seqlen, seqlen);
    const int64_t n_windows = max_windows > 0 ? max_windows : r->n_dataset_tokens / seqlen;
    EXPECT_EQ(r->n_windows, n_windows);
    EXPECT_EQ(r->n_tokens, n_windows * seqlen);
    EXPECT_EQ(r->n_predicted, n_windows * (seqlen - 1));
    std::printf("[ ppl      ] %s seqlen %lld windows %lld: %.6f (transformers %.6f), %.0f tokens/s\n", name.c_str(),
                static_cast<long long>(seqlen), static_cast<long long>(r->n_windows), r->ppl, want,
                r->tokens_per_second);
}

}  // namespace

TEST(ppl, tiny_llama_first_windows) {
    check_ppl(source_path("models/tiny-llama"), "tiny-llama", 512, 4, "ppl_seqlen512_windows4");
    check_ppl(source_path("models/tiny-llama"), "tiny-llama", 128, 3, "ppl_seqlen128_windows3");
}

TEST(ppl, small_llama_first_windows) {
    if (!shared_available()) GTEST_SKIP() << "../shared/models not found (only CI and the dev machines have ../shared)";
    check_ppl(shared_path("models/small-llama"), "small-llama", 512, 4, "ppl_seqlen512_windows4");
    check_ppl(shared_path("models/small-llama"), "small-llama", 128, 3, "ppl_seqlen128_windows3");
}

// The whole split: 791 windows of 512 tokens, about a minute in a release build on two cores.
// The reference (training_info.json, 153.97) is the same protocol run by transformers.
TEST(ppl, tiny_llama_full_wikitext2_seqlen512) {
#if defined(GPTQ_SANITIZE) || !defined(NDEBUG)
    GTEST_SKIP() << "full-dataset ppl runs in optimized builds without sanitizers only";
#endif
    check_ppl(source_path("models/tiny-llama"), "tiny-llama", 512, 0, "ppl_seqlen512");
}

TEST(ppl, errors_name_the_problem) {
    ppl_params p;
    p.model_path = source_path("models/tiny-llama");
    p.progress   = false;
    p.dataset    = "/nonexistent/text.txt";
    auto r       = ppl_run(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("/nonexistent/text.txt"), std::string::npos) << r.error().message();

    temp_dir dir("ppl");
    write_file(dir.file("short.txt"), "A short text.");
    p.dataset = dir.file("short.txt");
    p.seqlen  = 64;
    r         = ppl_run(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("fewer than one window of seqlen 64"), std::string::npos) << r.error().message();

    p.dataset = "wikitext2";
    p.seqlen  = 1;
    r         = ppl_run(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("seqlen"), std::string::npos) << r.error().message();

    p.seqlen     = 64;
    p.model_path = source_path("tests/data/model/nonexistent-model");
    r            = ppl_run(p);
    ASSERT_FALSE(r.is_ok());
}

TEST(ppl, dataset_path_is_read_as_is) {
    // A text file of our own: the same number as the bundled dataset's first windows would be
    // a coincidence, so compare against the bundled string cut to a prefix instead.
    const std::string joined = read_file(source_path("data/wikitext2/wiki.test.raw.gptq_join.txt"));
    ASSERT_GT(joined.size(), 20000u);
    temp_dir dir("ppl");
    write_file(dir.file("prefix.txt"), joined.substr(0, 20000));
    ppl_params p;
    p.model_path  = source_path("models/tiny-llama");
    p.seqlen      = 128;
    p.max_windows = 3;
    p.progress    = false;
    p.dataset     = dir.file("prefix.txt");
    auto r        = ppl_run(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    // 20000 characters hold well over 3 windows, and the first 384 tokens of a prefix are the
    // first 384 tokens of the whole text (up to a merge at the cut, far from the start).
    const double want = goldens()["tiny-llama"]["ppl_seqlen128_windows3"].get<double>();
    EXPECT_NEAR(r->ppl, want, k_ppl_rel_tol * want);
    EXPECT_LT(r->n_dataset_tokens, 10000);
}

TEST(ppl_cli, json_output_has_the_fields) {
    const auto r = run_command(gptq_binary() + " -q ppl " + source_path("models/tiny-llama") +
                               " --seqlen 64 --max-windows 2 --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    for (const char* key : {"ppl", "n_tokens", "n_windows", "seqlen", "seconds", "tokens_per_second"})
        EXPECT_TRUE(j.contains(key)) << key << " missing in " << r.out;
    EXPECT_EQ(j["n_windows"].get<int64_t>(), 2);
    EXPECT_EQ(j["seqlen"].get<int64_t>(), 64);
    EXPECT_EQ(j["n_tokens"].get<int64_t>(), 128);
    EXPECT_GT(j["ppl"].get<double>(), 1.0);
}

TEST(ppl_cli, missing_dataset_exits_1_with_one_line) {
    const auto r = run_command(gptq_binary() + " ppl " + source_path("models/tiny-llama") + " --dataset /no/such.txt");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("gptq: error: dataset '/no/such.txt'"), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty());
}

// Windows longer than the model's context (max_position_embeddings, 2048 for tiny-llama): an error
// naming both values, before anything is evaluated (issue 15). The check sits before the CPU / GPU
// split of ppl_run, so --device cuda gets the same.
TEST(ppl_cli, seqlen_past_the_context_exits_1_naming_both_values) {
    const auto r = run_command(gptq_binary() + " ppl " + source_path("models/tiny-llama") + " --seqlen 2049");
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("gptq: error: --seqlen 2049 is longer than the model's context of 2048 positions "
                         "(max_position_embeddings in "),
              std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_TRUE(r.out.empty());
    // A copy whose context is 64: --seqlen 65 refused, 64 (the context exactly) evaluated.
    temp_dir dir("ppl-ctx64");
    for (const auto& e : std::filesystem::directory_iterator(source_path("models/tiny-llama")))
        if (e.path().filename() != "config.json")
            std::filesystem::create_symlink(e.path(), std::filesystem::path(dir.path()) / e.path().filename());
    auto cfg                       = nlohmann::json::parse(read_file(source_path("models/tiny-llama/config.json")));
    cfg["max_position_embeddings"] = 64;
    write_file(dir.file("config.json"), cfg.dump());
    ppl_params p;
    p.model_path  = dir.path();
    p.seqlen      = 65;
    p.max_windows = 1;
    p.n_threads   = 2;
    p.progress    = false;
    auto over     = ppl_run(p);
    ASSERT_FALSE(over.is_ok());
    EXPECT_NE(over.error().message().find("--seqlen 65 is longer than the model's context of 64 positions"),
              std::string::npos)
        << over.error().message();
    p.seqlen = 64;
    auto ok  = ppl_run(p);
    ASSERT_TRUE(ok.is_ok()) << ok.error().message();
    EXPECT_EQ(ok->n_windows, 1);
}
