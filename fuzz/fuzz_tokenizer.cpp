// Fuzz entry points for tokenizer/: loading a hostile tokenizer.json, and encoding / decoding
// arbitrary bytes and ids with the bundled tokenizers (the tiny-llama tokenizer.json and
// tokenizer.model, and the byte-level seeds under fuzz/corpus/tokenizer_json).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>

#include "core/error.h"
#include "fuzz_common.h"
#include "fuzz_targets.h"
#include "tokenizer/tokenizer.h"

namespace gptq::fuzz {

namespace {

// Exercise a loaded tokenizer on `text` and on ids taken from the same bytes.
void exercise(const tokenizer& tok, std::string_view text) {
    const std::vector<int32_t> ids = tok.encode(text, true);
    for (int32_t id : ids) GPTQ_ASSERT(id >= 0 && id < tok.vocab_size());
    (void)tok.decode(ids, false);
    (void)tok.decode(ids, true);
    (void)tok.encode(text, false);
    // Arbitrary ids, in range or not.
    std::vector<int32_t> raw(text.size() / 4);
    if (!raw.empty()) std::memcpy(raw.data(), text.data(), raw.size() * 4);
    (void)tok.decode(raw, false);
    incremental_decoder inc(tok, true);
    for (int32_t id : raw) (void)inc.step(id);
    (void)inc.finish();
    for (size_t i = 0; i < raw.size() && i < 8; ++i) {
        const std::string piece = tok.id_to_piece(raw[i]);
        if (!piece.empty()) GPTQ_ASSERT(tok.piece_to_id(piece) >= 0);
        (void)tok.is_special(raw[i]);
    }
}

std::vector<std::unique_ptr<tokenizer>> load_bundled() {
    std::vector<std::unique_ptr<tokenizer>> out;
    std::vector<std::string>                paths = {source_path("models/tiny-llama"),
                                                     source_path("models/tiny-llama/tokenizer.model")};
    std::error_code                         ec;
    std::vector<std::string>                seeds;
    for (const auto& e : std::filesystem::directory_iterator(source_path("fuzz/corpus/tokenizer_json"), ec))
        seeds.push_back(e.path().string());
    std::sort(seeds.begin(), seeds.end());
    paths.insert(paths.end(), seeds.begin(), seeds.end());
    for (const auto& p : paths) {
        auto t = tokenizer::load(p);
        GPTQ_ASSERT_MSG(t.is_ok(), "a bundled tokenizer does not load");
        out.push_back(std::move(t).value());
    }
    return out;
}

}  // namespace

int fuzz_tokenizer_json(const uint8_t* data, size_t size) {
    scratch_clear();
    const std::string path = scratch_file("tokenizer.json");
    write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
    auto tok = tokenizer::load(path);
    if (!tok) return 0;
    exercise(**tok, "Hello world! 123 \xe2\x96\x81 \xc3\xa9t\xc3\xa9 <s> </s>\n\t  x");
    return 0;
}

int fuzz_tokenizer_text(const uint8_t* data, size_t size) {
    static const auto toks = load_bundled();
    if (size == 0) return 0;
    const tokenizer& tok = *toks[data[0] % toks.size()];
    exercise(tok, std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
    return 0;
}

}  // namespace gptq::fuzz
