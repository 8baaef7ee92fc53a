// `gptq serve`'s KV memory plan (docs/serve.md "Memory plan"): how many sequence slots and KV pages
// a budget of bytes holds. Pure arithmetic (serve.cpp gathers the inputs from the model_session),
// so the rules are unit-tested (test_kv_pages).
#pragma once

#include <cstdint>
#include <string>

#include "core/status.h"

namespace gptq {

struct serve_kv_inputs {
    int64_t     n_ctx        = 0;   // positions a sequence may hold (--ctx)
    int64_t     max_seqs     = 0;   // sequence slots wanted (>= 1)
    uint64_t    per_position = 0;   // KV bytes of one position (model_session::kv_bytes_per_position)
    uint64_t    budget       = 0;   // bytes the KV cache may take
    std::string budget_of;          // where the budget comes from, for the error ("--kv-memory 0.9 of ...")
    int64_t     page_size = 16;     // positions per KV page (the scheduler's and, paged, the backend's)
    bool        paged     = false;  // the backend's slots share a pool of pages (model_session::kv_page_size)
};

struct serve_plan {
    int64_t  n_ctx = 0, n_slots = 0;  // sequence slots of up to n_ctx positions
    int64_t  n_pages   = 0;           // KV pages of page_size positions, in all
    int64_t  page_size = 0;
    int64_t  n_fit     = 0;  // full-context sequences the budget holds
    bool     paged     = false;
    uint64_t budget = 0, per_position = 0;
    uint64_t kv_bytes = 0;  // what the plan allocates
};

// Paged: a pool of min(budget / page bytes, max_seqs x ceil(n_ctx / page_size)) pages shared by
// max_seqs slots (at most one per page), each of which may grow to n_ctx. Not paged (one cache of n_ctx positions per
// slot): min(max_seqs, budget / (n_ctx positions)) slots, their pages counted for the scheduler.
// Either way an error (STATUS_OUT_OF_MEMORY) when the budget holds no full-context sequence.
result<serve_plan> serve_kv_plan(const serve_kv_inputs& in);

}  // namespace gptq
