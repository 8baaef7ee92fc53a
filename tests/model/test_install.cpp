// An installed gptq (cmake --install) finds its bundled data under PREFIX/share/gptqkit (issue 15):
// the default calibration text of `quantize` and WikiText-2 of `ppl`, looked up relative to the
// executable (src/engine/data_files.cpp), not in the source tree it was built from.
#include <gtest/gtest.h>

#include <filesystem>

#include "test_util.h"

namespace fs = std::filesystem;
using namespace gptq;

TEST(install, installed_binary_finds_its_default_data_under_share) {
    test::temp_dir    dir("install");
    const std::string prefix = fs::weakly_canonical(dir.path()).string();
    auto              inst =
        test::run_command(std::string(GPTQ_CMAKE_COMMAND) + " --install " + GPTQ_BINARY_DIR + " --prefix " + prefix);
    ASSERT_EQ(inst.exit_code, 0) << inst.out << inst.err;
    const std::string gptq  = prefix + "/bin/gptq";
    const std::string share = prefix + "/share/gptqkit/data/";
    ASSERT_TRUE(fs::is_regular_file(gptq)) << inst.out;
    ASSERT_TRUE(fs::is_regular_file(share + "calib/corpus-sample.txt")) << inst.out;

    // quantize with the default --calib: its log names the file it calibrates on.
    auto q = test::run_command(gptq + " quantize " + test::source_path("models/tiny-llama") + " -o " + prefix +
                               "/tiny-w4 --nsamples 2 --seqlen 64 --threads 2");
    ASSERT_EQ(q.exit_code, 0) << q.err;
    EXPECT_NE(q.err.find("from " + share + "calib/corpus-sample.txt"), std::string::npos) << q.err;
    EXPECT_TRUE(fs::is_regular_file(prefix + "/tiny-w4/model.safetensors"));

    // ppl's default dataset, the same way.
    auto p = test::run_command(gptq + " ppl " + test::source_path("models/tiny-llama") +
                               " --seqlen 64 --max-windows 1 --threads 2");
    ASSERT_EQ(p.exit_code, 0) << p.err;
    EXPECT_NE(p.out.find(share + "wikitext2/wiki.test.raw.gptq_join.txt"), std::string::npos) << p.out;
}
