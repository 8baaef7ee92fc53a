// The paged KV cache's page allocator (kv_pages.h): a free list as a stack (the page released last
// is taken first, so a sequence that finishes hands its pages, warm in L2, to the next one), page
// tables kept on the host and the entries set since the last upload.
#include "model/kv_pages.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace gptq {

namespace {
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;
}

status kv_page_table::layout(int64_t n_seq, int64_t max_pages, int64_t n_pages, int64_t page_size) {
    if (page_size < 1 || (page_size & (page_size - 1)) != 0 || page_size > (int64_t(1) << 20))
        return make_error(E_ARG, "KV page size {}: expected a power of two from 1 to 2^20", page_size);
    if (n_seq < 0 || max_pages < 0 || n_pages < 0)
        return make_error(E_ARG, "KV pages: {} sequences of {} pages, a pool of {} pages", n_seq, max_pages, n_pages);
    // Page ids are I32 on the device, and so is each table offset (seq * max_pages + page).
    constexpr int64_t i32 = std::numeric_limits<int32_t>::max();
    if (n_pages > i32 || (max_pages > 0 && n_seq > i32 / max_pages))
        return make_error(E_ARG, "KV pages: a pool of {} pages, {} sequences x {} pages: more than 2^31 - 1", n_pages,
                          n_seq, max_pages);
    n_seq_     = n_seq;
    max_pages_ = max_pages;
    page_size_ = page_size;
    table_.assign(size_t(n_seq * max_pages), k_kv_page_none);
    held_.assign(size_t(n_seq), 0);
    owner_.assign(size_t(n_pages), -1);
    dirty_.assign(size_t(n_seq), max_pages);
    free_.resize(size_t(n_pages));
    for (int64_t i = 0; i < n_pages; ++i) free_[size_t(i)] = int32_t(n_pages - 1 - i);  // page 0 taken first
    return status::ok();
}

int64_t kv_page_table::pages_needed(int64_t seq, int64_t n_positions) const {
    return std::max<int64_t>(0, pages_for(n_positions) - held_[size_t(seq)]);
}

status kv_page_table::grow(int64_t seq, int64_t n_positions) {
    const std::pair<int64_t, int64_t> one{seq, n_positions};
    return grow_all(std::span(&one, 1));
}

status kv_page_table::grow_all(std::span<const std::pair<int64_t, int64_t>> seq_positions) {
    int64_t need = 0;
    for (size_t i = 0; i < seq_positions.size(); ++i) {
        const auto [seq, n_positions] = seq_positions[i];
        if (seq < 0 || seq >= n_seq_)
            return make_error(E_ARG, "KV pages for sequence {}: sequences 0 .. {} exist", seq, n_seq_ - 1);
        for (size_t j = 0; j < i; ++j)
            if (seq_positions[j].first == seq)
                return make_error(E_ARG, "KV pages: sequence {} listed twice in one step", seq);
        if (n_positions < 0 || pages_for(n_positions) > max_pages_)
            return make_error(E_ARG, "sequence {}: {} positions need {} KV pages of {}, a sequence holds at most {}",
                              seq, n_positions, pages_for(n_positions), page_size_, max_pages_);
        need += pages_needed(seq, n_positions);
    }
    if (need > n_free())
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of KV pages: the step needs {} new pages of {} positions, {} of the {} are free "
                          "({} in use)",
                          need, page_size_, n_free(), n_pages(), n_used());
    for (const auto& [seq, n_positions] : seq_positions) {
        const int64_t want = pages_for(n_positions);
        int64_t&      held = held_[size_t(seq)];
        if (want <= held) continue;
        dirty_[size_t(seq)] = std::min(dirty_[size_t(seq)], held);
        for (; held < want; ++held) {
            const int32_t page = free_.back();
            free_.pop_back();
            owner_[size_t(page)]                    = int32_t(seq);
            table_[size_t(seq * max_pages_ + held)] = page;
        }
    }
    return status::ok();
}

void kv_page_table::shrink(int64_t seq, int64_t n_positions) {
    if (seq < 0 || seq >= n_seq_) return;
    const int64_t keep = std::max<int64_t>(0, pages_for(n_positions));
    int64_t&      held = held_[size_t(seq)];
    for (; held > keep; --held) {
        int32_t& e = table_[size_t(seq * max_pages_ + held - 1)];
        GPTQ_ASSERT(e >= 0 && owner_[size_t(e)] == int32_t(seq));
        owner_[size_t(e)] = -1;
        free_.push_back(e);
        e = k_kv_page_none;
    }
    // Entries past `held` are no longer uploaded (nothing reads them).
    if (dirty_[size_t(seq)] >= held) dirty_[size_t(seq)] = max_pages_;
}

void kv_page_table::release_all() {
    for (int64_t s = 0; s < n_seq_; ++s) release(s);
}

std::vector<std::pair<int64_t, int64_t>> kv_page_table::dirty_take() {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int64_t s = 0; s < n_seq_; ++s) {
        int64_t& d = dirty_[size_t(s)];
        if (d < held_[size_t(s)]) out.emplace_back(s * max_pages_ + d, s * max_pages_ + held_[size_t(s)]);
        d = max_pages_;
    }
    return out;
}

}  // namespace gptq
