// stop_text (stop_text.h).
#include "stop_text.h"

#include <algorithm>

namespace gptq {

namespace {
// Length of the longest prefix of s[0, n) that does not end inside a UTF-8 sequence.
size_t utf8_boundary(const std::string& s, size_t n) {
    while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
    return n;
}
}  // namespace

stop_text::stop_text(std::vector<std::string> stop) : stop_(std::move(stop)) {
    for (const auto& s : stop_) max_stop_ = std::max(max_stop_, s.size());
}

std::string stop_text::push(std::string_view piece, bool final) {
    if (stopped_) return "";
    text_.append(piece);
    size_t       end  = text_.size();
    size_t       hit  = std::string::npos;
    const size_t from = emitted_ > max_stop_ ? emitted_ - max_stop_ : 0;  // a stop string may straddle
    for (const auto& s : stop_) hit = std::min(hit, text_.find(s, from));
    if (hit != std::string::npos) {
        text_.resize(hit);
        end      = hit;
        stopped_ = true;
    } else if (!final && max_stop_ > 0) {  // hold back what could still become a stop string
        end = text_.size() >= max_stop_ ? utf8_boundary(text_, text_.size() - (max_stop_ - 1)) : 0;
    }
    if (end <= emitted_) return "";
    std::string out = text_.substr(emitted_, end - emitted_);
    emitted_        = end;
    return out;
}

}  // namespace gptq
