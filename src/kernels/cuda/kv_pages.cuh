// Paged KV cache addressing (docs/cuda.md "KV pages"), shared by rope_kv_store and the attention
// kernels: the keys and values live in a pool of pages [n_pages][page_size][kv_dim] F16, and row r
// (a position) of sequence s is pool row
//
//     pages[s * pages_stride + r / page_size] * page_size + r % page_size
//
// pages nullptr: the rows are contiguous (row r at pool row r; local K/V, kernel tests). The table
// is device memory read when a kernel runs, so a captured CUDA graph follows page tables whose
// contents change between replays (the address stays). page_size is a power of two (a shift and
// a mask, not a division, per key in the decode kernel).
#pragma once

#include <cstdint>

#include "core/status.h"

namespace gptq::cuda {

struct kv_page_map {
    const int32_t* pages        = nullptr;  // device I32 [n_seq][pages_stride] page ids; nullptr: contiguous
    int64_t        page_size    = 0;        // positions per page, a power of two
    int64_t        pages_stride = 0;        // table entries per sequence
};

// A map that can address rows 0 .. n_rows - 1 of a sequence (page_size a power of two, n_rows <=
// pages_stride * page_size); `who` starts the INVALID_ARGUMENT message. A null map passes.
status kv_page_map_check(const kv_page_map& m, int64_t n_rows, const char* who);

#ifdef __CUDACC__
// The map as the kernels take it (the shift precomputed).
struct kv_page_dev {
    const int32_t* pages;
    int32_t        shift;  // log2(page_size)
    int64_t        stride;
};

inline kv_page_dev kv_page_dev_of(const kv_page_map& m) {
    int32_t shift = 0;
    while (m.pages && (int64_t(1) << shift) < m.page_size) ++shift;
    return kv_page_dev{m.pages, shift, m.pages_stride};
}

// The pool row of row r of sequence seq; negative when the table holds no page there.
__device__ inline int64_t kv_page_row(const kv_page_dev& m, int64_t seq, int64_t r) {
    if (!m.pages) return r;
    const int64_t page = m.pages[seq * m.stride + (r >> m.shift)];
    return page < 0 ? -1 : (page << m.shift) | (r & ((int64_t(1) << m.shift) - 1));
}
#endif

}  // namespace gptq::cuda
