// --device: parsing (include/gptq/device.h) and the CLI's errors for bad values. Runs in CI (no
// GPU): there `--device cuda` must fail with a message saying why; with a GPU it must work.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "gptq/device.h"
#include "test_util.h"

using namespace gptq;

TEST(device, parse_accepts_cpu_cuda_and_indices) {
    auto c = device_parse("cpu");
    ASSERT_TRUE(c.is_ok());
    EXPECT_FALSE(c->cuda);
    auto g = device_parse("cuda");
    ASSERT_TRUE(g.is_ok());
    EXPECT_TRUE(g->cuda);
    EXPECT_EQ(g->index, 0);
    auto g3 = device_parse("cuda:3");
    ASSERT_TRUE(g3.is_ok());
    EXPECT_TRUE(g3->cuda);
    EXPECT_EQ(g3->index, 3);
    EXPECT_EQ(device_name(*g3), "cuda:3");
    EXPECT_EQ(device_name(*c), "cpu");
    EXPECT_TRUE(device_check(*c).is_ok());
}

TEST(device, parse_rejects_bad_values_quoting_them) {
    for (const std::string bad :
         {"cuda:x", "cuda:", "cuda:-1", "cuda:1x", "cuda:99999999999", "gpu", "CUDA", "", "cpu:0"}) {
        auto r = device_parse(bad);
        ASSERT_FALSE(r.is_ok()) << bad;
        EXPECT_EQ(r.error().code(), status_code::STATUS_INVALID_ARGUMENT) << bad;
        EXPECT_NE(r.error().message().find("'" + bad + "'"), std::string::npos) << r.error().message();
    }
}

TEST(device, cli_rejects_bad_device_values) {
    const std::string model = test::source_path("models/tiny-llama");
    auto              r     = test::run_command(test::gptq_binary() + " ppl " + model + " --device cuda:x");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("cuda:x"), std::string::npos) << r.err;
    r = test::run_command(test::gptq_binary() + " generate " + model + " -p hi -n 1 --device tpu");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("'tpu'"), std::string::npos) << r.err;
}

TEST(device, cli_cuda_fails_cleanly_without_a_gpu_or_runs_with_one) {
    const std::string model = test::source_path("models/tiny-llama");
    const auto        r =
        test::run_command(test::gptq_binary() + " ppl " + model + " --device cuda --seqlen 64 --max-windows 1 --json");
    if (r.exit_code == 0) {  // a GPU (and a CUDA build): the JSON names it
        EXPECT_NE(r.out.find("\"device\":\"cuda:0\""), std::string::npos) << r.out;
    } else {  // no GPU or no CUDA in the build: a message saying which, not a crash
        EXPECT_EQ(r.exit_code, 1) << r.err;
        EXPECT_TRUE(r.err.find("no CUDA device") != std::string::npos ||
                    r.err.find("built without CUDA") != std::string::npos)
            << r.err;
    }
    // An index past the devices present (none here, or fewer than 1000 on any machine).
    const auto r2 = test::run_command(test::gptq_binary() + " generate " + model + " -p hi -n 1 --device cuda:999");
    EXPECT_NE(r2.exit_code, 0);
    EXPECT_NE(r2.err.find("cuda:999"), std::string::npos) << r2.err;
}

TEST(device, cli_quantize_device_is_checked_before_any_work) {
    const std::string model = test::source_path("models/tiny-llama");
    test::temp_dir    tmp("quantize-device");
    const std::string out = tmp.path() + "/out";
    auto r = test::run_command(test::gptq_binary() + " quantize " + model + " -o " + out + " --device tpu");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("'tpu'"), std::string::npos) << r.err;
    // No GPU here (or no such device on any machine): a message naming the device, no output folder.
    r = test::run_command(test::gptq_binary() + " quantize " + model + " -o " + out + " --device cuda:999");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("cuda:999"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(out));
    EXPECT_FALSE(std::filesystem::exists(out + ".partial"));
}

// The calibration runner (engine/calibration.h): --device cuda opens the CUDA one, which in a build
// without CUDA (or on a machine without a GPU) returns device_check's error before any work; with a
// GPU it quantizes.
TEST(device, cli_quantize_on_cuda_runs_or_says_why_not) {
    const std::string model = test::source_path("models/tiny-llama");
    test::temp_dir    tmp("quantize-cuda");
    const std::string out = tmp.path() + "/out";
    const auto        r   = test::run_command(test::gptq_binary() + " quantize " + model + " -o " + out +
                                              " --device cuda --nsamples 2 --seqlen 32 --bits 4 --group-size 64");
    if (r.exit_code == 0) {
        EXPECT_TRUE(std::filesystem::exists(out + "/model.safetensors")) << r.err;
    } else {
        EXPECT_EQ(r.exit_code, 1) << r.err;
        EXPECT_TRUE(r.err.find("no CUDA device") != std::string::npos ||
                    r.err.find("built without CUDA") != std::string::npos)
            << r.err;
        EXPECT_FALSE(std::filesystem::exists(out));
        EXPECT_FALSE(std::filesystem::exists(out + ".partial"));
    }
}
