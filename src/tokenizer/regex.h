// A PCRE2 regex compiled with UTF and Unicode properties (UCP), for the split patterns of
// byte-level BPE pre-tokenizers. Inputs must be valid UTF-8 (the tokenizer sanitizes first).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace gptq {

class split_regex {
public:
    // `where` names the file and component for errors ("tokenizer.json: pre_tokenizer Split").
    static result<std::shared_ptr<split_regex>> compile(const std::string& pattern, const std::string& where);
    ~split_regex();

    // Byte ranges [begin, end) of all non-overlapping matches, left to right. An empty match
    // advances by one code point and is not reported.
    std::vector<std::pair<size_t, size_t>> find_all(std::string_view text) const;

    split_regex(const split_regex&)            = delete;
    split_regex& operator=(const split_regex&) = delete;

private:
    split_regex() = default;
    void* code_   = nullptr;  // pcre2_code_8*
    bool  jit_    = false;
};

}  // namespace gptq
