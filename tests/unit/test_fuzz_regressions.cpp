// Replays every input under tests/data/fuzz-regressions/<target>/ (inputs that once crashed a fuzz
// target, docs/reliability.md) and the seed corpus fuzz/corpus/<target>/ through the same entry
// points the libFuzzer executables use. A regression shows up as a sanitizer report or an abort in
// the ASan build; in the release build, as a crash or a GPTQ_ASSERT.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "fuzz_targets.h"
#include "test_util.h"

namespace fs = std::filesystem;
using gptq::test::read_file;
using gptq::test::source_path;

namespace {

std::vector<std::string> files_under(const std::string& dir) {
    std::vector<std::string> out;
    std::error_code          ec;
    for (const auto& e : fs::directory_iterator(dir, ec))
        if (e.is_regular_file()) out.push_back(e.path().string());
    std::sort(out.begin(), out.end());
    return out;
}

size_t replay(const gptq::fuzz::fuzz_target& t, const std::string& dir) {
    size_t n = 0;
    for (const auto& path : files_under(dir)) {
        SCOPED_TRACE(path);
        const std::string bytes = read_file(path);
        EXPECT_EQ(t.fn(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), 0);
        ++n;
    }
    return n;
}

}  // namespace

TEST(fuzz_regressions, every_target_has_seeds_and_replays_them) {
    for (const auto& t : gptq::fuzz::fuzz_targets()) {
        SCOPED_TRACE(t.name);
        EXPECT_GT(replay(t, source_path(std::string("fuzz/corpus/") + t.name)), 0u) << "no seed inputs";
    }
}

TEST(fuzz_regressions, crashing_inputs_found_by_fuzzing_are_handled) {
    size_t n = 0;
    for (const auto& t : gptq::fuzz::fuzz_targets()) {
        SCOPED_TRACE(t.name);
        n += replay(t, source_path(std::string("tests/data/fuzz-regressions/") + t.name));
    }
    // Every folder name must be a target name (a typo would silently skip its inputs).
    for (const auto& e : fs::directory_iterator(source_path("tests/data/fuzz-regressions"))) {
        if (!e.is_directory()) continue;
        const auto& targets = gptq::fuzz::fuzz_targets();
        EXPECT_TRUE(
            std::any_of(targets.begin(), targets.end(), [&](const auto& t) { return e.path().filename() == t.name; }))
            << e.path() << " is not the name of a fuzz target";
    }
    RecordProperty("inputs", static_cast<int>(n));
}
