// include/gptq/tokenize.h over src/tokenizer.
#include "gptq/tokenize.h"

#include <fmt/format.h>

#include "tokenizer/tokenizer.h"

namespace gptq {

tokenizer_handle::tokenizer_handle(std::unique_ptr<tokenizer> impl) : impl_(std::move(impl)) {}
tokenizer_handle::tokenizer_handle(tokenizer_handle&&) noexcept            = default;
tokenizer_handle& tokenizer_handle::operator=(tokenizer_handle&&) noexcept = default;
tokenizer_handle::~tokenizer_handle()                                      = default;

result<tokenizer_handle> tokenizer_handle::load(const std::string& path) {
    auto r = tokenizer::load(path);
    if (!r) return r.error();
    return tokenizer_handle(std::move(r).value());
}

std::vector<int32_t> tokenizer_handle::encode(std::string_view text, bool add_special) const {
    return impl_->encode(text, add_special);
}

std::string tokenizer_handle::decode(const std::vector<int32_t>& ids, bool skip_special) const {
    return impl_->decode(ids, skip_special);
}

std::vector<std::string> tokenizer_handle::pieces(const std::vector<int32_t>& ids) const {
    std::vector<std::string> out;
    out.reserve(ids.size());
    for (int32_t id : ids) out.push_back(impl_->id_to_piece(id));
    return out;
}

int32_t tokenizer_handle::bos_id() const {
    return impl_->bos_id();
}
int32_t tokenizer_handle::vocab_size() const {
    return impl_->vocab_size();
}

std::string tokenizer_handle::description() const {
    return fmt::format("{} (vocab {}, BOS {})", tokenizer_kind_name(impl_->kind()), impl_->vocab_size(),
                       impl_->adds_bos() ? std::to_string(impl_->bos_id()) : std::string("none"));
}

}  // namespace gptq
