// Public tokenizer API for tools: load the tokenizer of a model folder, encode, decode, pieces.
// The library side is src/tokenizer (tokenizer::load); this is a thin handle over it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gptq/status.h"

namespace gptq {

class tokenizer;

class tokenizer_handle {
public:
    // `path`: a model folder or one tokenizer file (tokenizer.json, vocab.json, tokenizer.model).
    static result<tokenizer_handle> load(const std::string& path);

    tokenizer_handle(tokenizer_handle&&) noexcept;
    tokenizer_handle& operator=(tokenizer_handle&&) noexcept;
    ~tokenizer_handle();

    // add_special: add what the tokenizer adds around a sequence (BOS for Llama-style ones).
    std::vector<int32_t>     encode(std::string_view text, bool add_special) const;
    std::string              decode(const std::vector<int32_t>& ids, bool skip_special) const;
    std::vector<std::string> pieces(const std::vector<int32_t>& ids) const;  // vocabulary strings
    int32_t                  bos_id() const;                                 // -1: none
    int32_t                  vocab_size() const;
    std::string              description() const;  // "tokenizer.json (vocab 32000, BOS 1)"

private:
    explicit tokenizer_handle(std::unique_ptr<tokenizer> impl);
    std::unique_ptr<tokenizer> impl_;
};

}  // namespace gptq
