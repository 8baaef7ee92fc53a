// The bookkeeping of a paged KV cache (docs/cuda.md "KV pages"): a pool of n_pages pages of
// page_size positions shared by n_seq sequences. Each sequence has a page table: position r of
// sequence s lives in page table(s)[r / page_size], row r % page_size of that page. Pages are taken
// from a free list as a sequence's positions grow and go back when it is reset, so memory is
// shared between sequences and never fragments (every page is as good as any other).
//
//     kv_page_table t;
//     GPTQ_TRY(t.layout(/*n_seq=*/4, /*max_pages=*/ceil(n_ctx / 16), /*n_pages=*/100, /*page_size=*/16));
//     GPTQ_TRY(t.grow(2, 40));            // sequence 2 holds 40 positions: 3 pages
//     for (auto [b, e] : t.dirty_take())  // table entries [b, e) changed: upload them
//         upload(t.table() + b, e - b);
//     t.release(2);                       // its pages back to the free list
//
// Host only (no CUDA): llama_cuda_model keeps one and uploads the table to the device; the
// allocator's rules are tested on the CPU (test_kv_pages).
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "core/status.h"

namespace gptq {

// A page table entry that holds no page.
constexpr int32_t k_kv_page_none = -1;

class kv_page_table {
public:
    // n_seq sequences of at most max_pages pages each, a pool of n_pages pages of page_size
    // positions (a power of two: the kernels split a position with a shift and a mask). Every
    // sequence starts empty and every page free. Errors name the value out of range.
    status layout(int64_t n_seq, int64_t max_pages, int64_t n_pages, int64_t page_size);

    int64_t n_seq() const { return n_seq_; }
    int64_t max_pages() const { return max_pages_; }  // table entries per sequence
    int64_t n_pages() const { return int64_t(owner_.size()); }
    int64_t page_size() const { return page_size_; }
    int64_t n_free() const { return int64_t(free_.size()); }
    int64_t n_used() const { return n_pages() - n_free(); }
    int64_t seq_pages(int64_t seq) const { return held_[size_t(seq)]; }  // pages sequence seq holds

    // Pages of page_size positions that n_positions positions take.
    int64_t pages_for(int64_t n_positions) const { return (n_positions + page_size_ - 1) / page_size_; }
    // New pages sequence seq needs to hold n_positions positions (0 when it holds enough).
    int64_t pages_needed(int64_t seq, int64_t n_positions) const;

    // Sequence seq holds n_positions positions: the missing pages come from the free list. When the
    // free pages are too few (or n_positions is past max_pages pages) it is an error naming what was
    // asked and what is free, and nothing is taken.
    status grow(int64_t seq, int64_t n_positions);
    // grow() of several sequences at once (each (seq, n_positions), sequences distinct): every page
    // is checked first, so either all grow or none does.
    status grow_all(std::span<const std::pair<int64_t, int64_t>> seq_positions);
    // Sequence seq keeps the pages of its first n_positions positions; the rest go back.
    void shrink(int64_t seq, int64_t n_positions);
    void release(int64_t seq) { shrink(seq, 0); }
    void release_all();

    // The tables, [n_seq][max_pages] I32 row-major: page ids, k_kv_page_none where a sequence holds
    // no page.
    const int32_t* table() const { return table_.data(); }
    // Entries of table() set since the last call, as flat ranges [begin, end) (one per sequence that
    // took pages); entries that were cleared are not listed (no kernel reads past a sequence's
    // positions, so a stale device entry is never used).
    std::vector<std::pair<int64_t, int64_t>> dirty_take();

private:
    int64_t              n_seq_ = 0, max_pages_ = 0, page_size_ = 0;
    std::vector<int32_t> table_;  // [n_seq][max_pages]
    std::vector<int64_t> held_;   // [n_seq] pages held
    std::vector<int32_t> free_;   // a stack: the next page taken is free_.back()
    std::vector<int32_t> owner_;  // [n_pages] the sequence holding the page, -1 free (checks)
    std::vector<int64_t> dirty_;  // [n_seq] first entry set since dirty_take, or max_pages: none
};

}  // namespace gptq
