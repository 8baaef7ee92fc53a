// libFuzzer driver: one executable per entry point of fuzz_targets.h, chosen at compile time by
// GPTQ_FUZZ_ENTRY (fuzz/CMakeLists.txt). Built with clang -fsanitize=fuzzer,address,undefined.
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    return gptq::fuzz::GPTQ_FUZZ_ENTRY(data, size);
}
