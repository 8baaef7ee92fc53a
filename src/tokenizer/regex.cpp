#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.h"

#include <pcre2.h>

#include "core/error.h"

namespace gptq {

result<std::shared_ptr<split_regex>> split_regex::compile(const std::string& pattern, const std::string& where) {
    int         err_code   = 0;
    PCRE2_SIZE  err_offset = 0;
    pcre2_code* code       = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                           PCRE2_UTF | PCRE2_UCP, &err_code, &err_offset, nullptr);
    if (!code) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(err_code, buf, sizeof(buf));
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: regex '{}' does not compile at offset {}: {}", where,
                          pattern, err_offset, reinterpret_cast<const char*>(buf));
    }
    std::shared_ptr<split_regex> re(new split_regex());
    re->code_ = code;
    re->jit_  = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return re;
}

split_regex::~split_regex() {
    if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
}

std::vector<std::pair<size_t, size_t>> split_regex::find_all(std::string_view text) const {
    std::vector<std::pair<size_t, size_t>> out;
    auto*                                  code = static_cast<pcre2_code*>(code_);
    pcre2_match_data*                      md   = pcre2_match_data_create_from_pattern(code, nullptr);
    const auto*                            subj = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t                                 pos  = 0;
    while (pos <= text.size()) {
        const int rc = jit_ ? pcre2_jit_match(code, subj, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr)
                            : pcre2_match(code, subj, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a resource limit (treated as no more matches)
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t      b = ov[0], e = ov[1];
        if (e > b) {
            out.emplace_back(b, e);
            pos = e;
        } else {
            if (b >= text.size()) break;
            pos = b + 1;
            while (pos < text.size() && (static_cast<uint8_t>(text[pos]) & 0xC0) == 0x80) ++pos;
        }
    }
    pcre2_match_data_free(md);
    return out;
}

}  // namespace gptq
