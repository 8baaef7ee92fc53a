// The fuzz entry points (docs/reliability.md). Each takes one input (arbitrary bytes), drives one
// loader through the same calls the tool makes, and checks the invariants a successful load
// promises; a bug shows up as a sanitizer report or a GPTQ_ASSERT abort, never as a return value.
// They are plain functions so that the libFuzzer executables (fuzz_main.cpp, GPTQ_FUZZ=ON, clang)
// and the regression test (tests/unit/test_fuzz_regressions.cpp, any compiler) share them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gptq::fuzz {

// input: a whole .safetensors file image.
int fuzz_safetensors(const uint8_t* data, size_t size);
// input: a folder as "name\n<bytes>" parts joined by k_part_separator (fuzz_common.h); opened
// through tensor_source (model.safetensors.index.json + shards).
int fuzz_tensor_source(const uint8_t* data, size_t size);
// input: one JSON text, parsed as config.json, quantization config and generation_config.json.
int fuzz_config(const uint8_t* data, size_t size);
// input: a tokenizer.json; loaded, then used on a fixed text and on ids.
int fuzz_tokenizer_json(const uint8_t* data, size_t size);
// input: first byte picks one of the bundled tokenizers, the rest is text to encode / ids to decode.
int fuzz_tokenizer_text(const uint8_t* data, size_t size);
// input: 12 bytes of module parameters (bits, group size, shapes, format) + a .safetensors image
// holding one GPTQ module; read with gptq_linear_read and dequantized.
int fuzz_gptq_module(const uint8_t* data, size_t size);
// input: a chat template (Jinja text), rendered for four fixed messages with and without the
// generation prompt.
int fuzz_chat_template(const uint8_t* data, size_t size);
// input: a --max-memory value, a newline, then a --device-map JSON file; planned for a fixed small
// Llama shape (auto and from the file); a plan that succeeds fits its limits and round-trips.
int fuzz_device_map(const uint8_t* data, size_t size);
// input: first byte odd = /v1/chat/completions, even = /v1/completions; the rest is the request
// body, parsed as `gptq serve` does; its stop strings run over a fixed text.
int fuzz_serve_request(const uint8_t* data, size_t size);

struct fuzz_target {
    const char* name;  // also the folder name under fuzz/corpus and tests/data/fuzz-regressions
    int (*fn)(const uint8_t*, size_t);
};
const std::vector<fuzz_target>& fuzz_targets();

}  // namespace gptq::fuzz
