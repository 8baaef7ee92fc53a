// The KV memory plan of `gptq serve` (serve_plan.h).
#include "serve_plan.h"

#include <algorithm>

#include "core/error.h"
#include "host_memory.h"  // human_bytes

namespace gptq {

result<serve_plan> serve_kv_plan(const serve_kv_inputs& in) {
    if (in.n_ctx < 1 || in.max_seqs < 1 || in.page_size < 1 || in.per_position == 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "KV plan: context {}, {} sequences, pages of {}, {} bytes a position", in.n_ctx, in.max_seqs,
                          in.page_size, in.per_position);
    serve_plan p;
    p.n_ctx                    = in.n_ctx;
    p.page_size                = in.page_size;
    p.paged                    = in.paged;
    p.budget                   = in.budget;
    p.per_position             = in.per_position;
    const int64_t  pages_full  = (in.n_ctx + in.page_size - 1) / in.page_size;  // one full-context sequence
    const uint64_t per_seq     = in.per_position * uint64_t(in.n_ctx);
    const uint64_t per_page    = in.per_position * uint64_t(in.page_size);
    const uint64_t full_budget = in.paged ? per_page * uint64_t(pages_full) : per_seq;
    p.n_fit                    = int64_t(in.budget / full_budget);
    if (p.n_fit < 1)
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "the KV budget ({}: {}) holds no sequence of --ctx {} positions ({} each); lower --ctx or "
                          "raise --kv-memory",
                          in.budget_of, human_bytes(in.budget), in.n_ctx, human_bytes(full_budget));
    if (in.paged) {
        p.n_pages = std::min<int64_t>(int64_t(in.budget / per_page), in.max_seqs * pages_full);
        // Every slot shares the pool; a slot that could not get one page would never run.
        p.n_slots  = std::min<int64_t>(in.max_seqs, p.n_pages);
        p.kv_bytes = uint64_t(p.n_pages) * per_page;
    } else {
        p.n_slots  = std::min<int64_t>(in.max_seqs, p.n_fit);
        p.n_pages  = p.n_slots * pages_full;
        p.kv_bytes = per_seq * uint64_t(p.n_slots);
    }
    return p;
}

}  // namespace gptq
