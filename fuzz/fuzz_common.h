// Helpers shared by the fuzz entry points: a scratch folder per process, writing inputs to files
// (the loaders memory-map files), and splitting one input into several named files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gptq::fuzz {

// Separates the files of a multi-file input (fuzz_tensor_source). Each part is "name\n<bytes>".
constexpr std::string_view k_part_separator = "\n--gptq-fuzz-part--\n";

struct input_part {
    std::string      name;  // sanitised: [A-Za-z0-9._-], at most 64 chars, never "." or ".."
    std::string_view bytes;
};
std::vector<input_part> split_parts(const uint8_t* data, size_t size);

// A folder private to this process (created on first use, removed at exit); cleared by
// scratch_clear(). Paths inside it are returned by scratch_file().
const std::string& scratch_dir();
void               scratch_clear();
std::string        scratch_file(const std::string& name);

// Write bytes to path (truncating); aborts on I/O failure (the harness, not the input, is broken).
void write_bytes(const std::string& path, std::string_view bytes);

// The source tree (for the bundled tokenizers the text target loads).
std::string source_path(const std::string& rel);

}  // namespace gptq::fuzz
