// gptq bench (include/gptq/bench.h) on a make-random micro model: rows with the right token counts
// and positive rates, the FP16 comparison, --json lines that parse, and argument errors.
// Nothing here is timed against a threshold: rates only have to be positive.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "gptq/bench.h"
#include "gptq/make_random.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

// One micro model for the whole file.
class Bench : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        dir_ = new temp_dir("bench");
        make_random_params p;
        p.like        = "micro";
        p.output_path = dir_->file("micro");
        p.progress    = false;
        auto r        = make_random_model(p);
        ASSERT_TRUE(r.is_ok()) << r.error().message();
    }
    static void TearDownTestSuite() {
        delete dir_;
        dir_ = nullptr;
    }
    static std::string model() { return dir_->file("micro"); }

    static bench_params small() {
        bench_params p;
        p.model_path = model();
        p.batches    = {1, 3};
        p.prompt     = 8;
        p.gen        = 3;
        p.repeat     = 2;
        p.n_threads  = 2;
        p.progress   = false;
        return p;
    }
    static temp_dir* dir_;
};
temp_dir* Bench::dir_ = nullptr;

}  // namespace

TEST_F(Bench, RowsHaveTheTokenCountsAndPositiveRates) {
    auto r = bench_run(small());
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    ASSERT_EQ(r->rows.size(), 2u);
    const int64_t batches[] = {1, 3};
    for (size_t i = 0; i < 2; ++i) {
        const bench_row& row = r->rows[i];
        EXPECT_EQ(row.batch, batches[i]);
        EXPECT_EQ(row.role, "model");
        EXPECT_EQ(row.model, "micro");
        EXPECT_EQ(row.device, "cpu");
        EXPECT_EQ(row.weights, "float16");
        EXPECT_EQ(row.n_threads, 2);
        EXPECT_EQ(row.prefill_tokens, 8 * batches[i]);
        EXPECT_EQ(row.decode_tokens, 3 * batches[i]);
        EXPECT_GT(row.prefill_seconds, 0.0);
        EXPECT_GT(row.decode_seconds, 0.0);
        EXPECT_NEAR(row.prefill_tok_per_s, static_cast<double>(row.prefill_tokens) / row.prefill_seconds, 1e-6);
        EXPECT_NEAR(row.decode_tok_per_s, static_cast<double>(row.decode_tokens) / row.decode_seconds, 1e-6);
        EXPECT_NEAR(row.ttft_ms, row.prefill_seconds * 1e3, 1e-9);
        EXPECT_NEAR(row.decode_ms_per_step, row.decode_seconds * 1e3 / 3, 1e-9);
        EXPECT_GT(row.peak_memory_bytes, 0u);
        EXPECT_EQ(row.memory_kind, "host_rss");
        EXPECT_FALSE(row.machine.empty());
    }
    const std::string text = bench_result_text(*r);
    EXPECT_NE(text.find("prefill tok/s"), std::string::npos);
    EXPECT_NE(text.find("micro"), std::string::npos);
}

TEST_F(Bench, CompareFp16AddsTheOriginalAndRatios) {
    bench_params p = small();
    p.batches      = {2};
    p.repeat       = 1;
    p.compare_fp16 = model();
    auto r         = bench_run(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    ASSERT_EQ(r->rows.size(), 2u);
    EXPECT_EQ(r->rows[0].role, "model");
    EXPECT_EQ(r->rows[1].role, "fp16");
    EXPECT_GT(r->rows[0].prefill_vs_fp16, 0.0);
    EXPECT_GT(r->rows[0].decode_vs_fp16, 0.0);
    EXPECT_NEAR(r->rows[0].decode_vs_fp16, r->rows[0].decode_tok_per_s / r->rows[1].decode_tok_per_s, 1e-9);
    EXPECT_NE(bench_result_text(*r).find("vs fp16"), std::string::npos);
}

TEST_F(Bench, BadArguments) {
    struct bad_case {
        const char* what;
        void (*edit)(bench_params&);
        const char* message;
    };
    const bad_case cases[] = {
        // No GPU in the test environment (CPU builds: no CUDA at all): both say so and point to cpu.
        {"cuda", [](bench_params& p) { p.device = "cuda"; }, "use --device cpu"},
        {"cuda:1", [](bench_params& p) { p.device = "cuda:1"; }, "use --device cpu"},
        {"cuda batch 32",
         [](bench_params& p) {
             p.device  = "cuda";
             p.batches = {1, 4, 300};
         },
         "--batch 300 on --device cuda:0: the GPU model runs up to 256 sequences"},
        {"device", [](bench_params& p) { p.device = "tpu"; }, "'tpu'"},
        {"batch 0",
         [](bench_params& p) {
             p.batches = {1, 0};
         },
         "--batch 0"},
        {"no batch", [](bench_params& p) { p.batches.clear(); }, "--batch"},
        {"prompt", [](bench_params& p) { p.prompt = 0; }, "--prompt 0"},
        {"gen", [](bench_params& p) { p.gen = 0; }, "--gen 0"},
        {"repeat", [](bench_params& p) { p.repeat = 0; }, "--repeat 0"},
        {"model", [](bench_params& p) { p.model_path = "/nonexistent/model"; }, "/nonexistent/model"},
        {"original", [](bench_params& p) { p.compare_fp16 = "/nonexistent/orig"; }, "/nonexistent/orig"},
        {"profile ops on cpu", [](bench_params& p) { p.profile_ops = true; }, "--profile-ops"},
    };
    for (const auto& c : cases) {
        bench_params p = small();
        p.batches      = {1};
        p.repeat       = 1;
        c.edit(p);
        auto r = bench_run(p);
        ASSERT_FALSE(r.is_ok()) << c.what;
        EXPECT_NE(r.error().message().find(c.message), std::string::npos) << c.what << ": " << r.error().message();
    }
}

TEST_F(Bench, CliJsonLinesParse) {
    auto r = run_command(gptq_binary() + " -q bench " + model() +
                         " --json --batch 1,2 --prompt 4 --gen 2 --repeat 1 --threads 1 --seed 5");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::istringstream in(r.out);
    std::string        line;
    int                n = 0;
    while (std::getline(in, line)) {
        auto j = nlohmann::json::parse(line);
        EXPECT_EQ(j["batch"].get<int64_t>(), n + 1);
        EXPECT_EQ(j["prefill_tokens"].get<int64_t>(), 4 * (n + 1));
        EXPECT_EQ(j["decode_tokens"].get<int64_t>(), 2 * (n + 1));
        EXPECT_EQ(j["threads"].get<int>(), 1);
        EXPECT_EQ(j["device"], "cpu");
        EXPECT_TRUE(j["machine"].is_string());
        EXPECT_GT(j["prefill_tok_per_s"].get<double>(), 0.0);
        EXPECT_GT(j["decode_tok_per_s"].get<double>(), 0.0);
        EXPECT_GT(j["peak_memory_bytes"].get<uint64_t>(), 0u);
        ++n;
    }
    EXPECT_EQ(n, 2);
}

TEST_F(Bench, CliErrors) {
    auto cuda = run_command(gptq_binary() + " bench " + model() + " --device cuda --batch 1,300");
    EXPECT_EQ(cuda.exit_code, 1);
    EXPECT_NE(cuda.err.find("--batch 300 on --device cuda:0"), std::string::npos) << cuda.err;  // at most 256
    auto cuda1 = run_command(gptq_binary() + " bench " + model() + " --device cuda --batch 1");
    EXPECT_EQ(cuda1.exit_code, 1);
    EXPECT_NE(cuda1.err.find("use --device cpu"), std::string::npos) << cuda1.err;
    EXPECT_EQ(run_command(gptq_binary() + " bench " + model() + " --batch 0").exit_code, 2);
    EXPECT_EQ(run_command(gptq_binary() + " bench " + model() + " --batch 1,x").exit_code, 2);
    EXPECT_EQ(run_command(gptq_binary() + " bench " + model() + " --gen 0").exit_code, 2);
    EXPECT_EQ(run_command(gptq_binary() + " bench").exit_code, 2);
}
