// The paged KV cache's CPU-side rules: the page allocator (model/kv_pages.h: free list, page tables,
// the entries to upload, out-of-pages errors that take nothing) and gptq serve's KV memory plan
// (engine/serve_plan.h: pages from a byte budget, paged and not). The GPU kernels that read the
// tables are tested on the device (test_cuda_kernels, test_llama_cuda "paged_*").
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "engine/serve_plan.h"
#include "model/kv_pages.h"

namespace gptq {
namespace {

// Every page is held by exactly one sequence or free, and each table row holds its pages first.
void expect_consistent(const kv_page_table& t) {
    std::set<int32_t> seen;
    int64_t           held = 0;
    for (int64_t s = 0; s < t.n_seq(); ++s) {
        for (int64_t j = 0; j < t.max_pages(); ++j) {
            const int32_t e = t.table()[s * t.max_pages() + j];
            if (j < t.seq_pages(s)) {
                ASSERT_GE(e, 0);
                ASSERT_LT(e, t.n_pages());
                ASSERT_TRUE(seen.insert(e).second) << "page " << e << " held twice";
            } else {
                ASSERT_EQ(e, k_kv_page_none) << "sequence " << s << " entry " << j;
            }
        }
        held += t.seq_pages(s);
    }
    EXPECT_EQ(held, t.n_used());
    EXPECT_EQ(t.n_used() + t.n_free(), t.n_pages());
}

TEST(kv_pages, grow_takes_pages_as_positions_grow_and_release_returns_them) {
    kv_page_table t;
    ASSERT_TRUE(t.layout(3, 4, 7, 16).is_ok());
    EXPECT_EQ(t.n_free(), 7);
    EXPECT_EQ(t.pages_for(0), 0);
    EXPECT_EQ(t.pages_for(1), 1);
    EXPECT_EQ(t.pages_for(16), 1);
    EXPECT_EQ(t.pages_for(17), 2);
    ASSERT_TRUE(t.grow(1, 17).is_ok());  // 2 pages: 0, 1 (the free list starts at page 0)
    EXPECT_EQ(t.table()[4], 0);
    EXPECT_EQ(t.table()[5], 1);
    ASSERT_TRUE(t.grow(0, 1).is_ok());   // page 2
    ASSERT_TRUE(t.grow(1, 32).is_ok());  // still 2 pages: nothing taken
    EXPECT_EQ(t.n_used(), 3);
    ASSERT_TRUE(t.grow(1, 33).is_ok());  // page 3, after sequence 0's: interleaved
    EXPECT_EQ(t.table()[6], 3);
    EXPECT_EQ(t.pages_needed(1, 48), 0);
    EXPECT_EQ(t.pages_needed(1, 49), 1);
    expect_consistent(t);
    t.release(1);  // pages 3, 1, 0 back (last first)
    EXPECT_EQ(t.n_used(), 1);
    EXPECT_EQ(t.seq_pages(1), 0);
    expect_consistent(t);
    ASSERT_TRUE(t.grow(2, 40).is_ok());  // takes the released pages, the last released first
    EXPECT_EQ(t.table()[8], 0);
    EXPECT_EQ(t.table()[9], 1);
    EXPECT_EQ(t.table()[10], 3);
    t.shrink(2, 20);  // keeps 2 pages
    EXPECT_EQ(t.seq_pages(2), 2);
    expect_consistent(t);
    t.release_all();
    EXPECT_EQ(t.n_used(), 0);
    expect_consistent(t);
}

TEST(kv_pages, out_of_pages_names_the_need_and_takes_nothing) {
    kv_page_table t;
    ASSERT_TRUE(t.layout(3, 8, 5, 4).is_ok());
    ASSERT_TRUE(t.grow(0, 12).is_ok());  // 3 pages
    const std::vector<int32_t> before(t.table(), t.table() + 24);
    auto                       st = t.grow(1, 9);  // 3 pages, 2 free
    ASSERT_FALSE(st.is_ok());
    EXPECT_EQ(st.code(), status_code::STATUS_OUT_OF_MEMORY);
    EXPECT_NE(st.message().find("needs 3 new pages of 4 positions, 2 of the 5 are free"), std::string::npos)
        << st.message();
    EXPECT_EQ(std::vector<int32_t>(t.table(), t.table() + 24), before);
    EXPECT_EQ(t.n_free(), 2);
    // Together: 1 + 1 + 1 pages, 2 free: none taken.
    const std::pair<int64_t, int64_t> three[] = {{0, 13}, {1, 1}, {2, 1}};
    st                                        = t.grow_all(three);
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("needs 3 new pages"), std::string::npos) << st.message();
    EXPECT_EQ(t.n_free(), 2);
    EXPECT_EQ(std::vector<int32_t>(t.table(), t.table() + 24), before);
    ASSERT_TRUE(t.grow_all(std::span(three).first(2)).is_ok());
    EXPECT_EQ(t.n_free(), 0);
    // Past a sequence's table, an unknown sequence, one listed twice: errors naming them.
    EXPECT_NE(t.grow(2, 33).message().find("at most 8"), std::string::npos);
    EXPECT_NE(t.grow(3, 1).message().find("sequence 3"), std::string::npos);
    const std::pair<int64_t, int64_t> twice[] = {{2, 1}, {2, 2}};
    EXPECT_NE(t.grow_all(twice).message().find("twice"), std::string::npos);
    expect_consistent(t);
}

TEST(kv_pages, dirty_ranges_list_the_entries_set_since_the_last_upload) {
    kv_page_table t;
    ASSERT_TRUE(t.layout(3, 5, 15, 2).is_ok());
    EXPECT_TRUE(t.dirty_take().empty());
    ASSERT_TRUE(t.grow(2, 3).is_ok());
    ASSERT_TRUE(t.grow(0, 1).is_ok());
    using ranges = std::vector<std::pair<int64_t, int64_t>>;
    EXPECT_EQ(t.dirty_take(), (ranges{{0, 1}, {10, 12}}));
    EXPECT_TRUE(t.dirty_take().empty());
    ASSERT_TRUE(t.grow(2, 4).is_ok());  // no new page
    EXPECT_TRUE(t.dirty_take().empty());
    ASSERT_TRUE(t.grow(2, 7).is_ok());  // entries 2, 3
    EXPECT_EQ(t.dirty_take(), (ranges{{12, 14}}));
    // Released then taken again before an upload: the whole new run.
    ASSERT_TRUE(t.grow(1, 4).is_ok());
    t.release(1);
    EXPECT_TRUE(t.dirty_take().empty());  // nothing to upload for entries nobody reads
    ASSERT_TRUE(t.grow(1, 2).is_ok());
    t.release(1);
    ASSERT_TRUE(t.grow(1, 5).is_ok());
    EXPECT_EQ(t.dirty_take(), (ranges{{5, 8}}));
    // A shrink below the first entry set keeps only what is still held.
    ASSERT_TRUE(t.grow(0, 10).is_ok());  // entries 1 .. 4
    t.shrink(0, 4);                      // holds 2 pages
    EXPECT_EQ(t.dirty_take(), (ranges{{1, 2}}));
}

// Random grows and releases in alternation over many sequences: the invariants always hold and the
// uploaded entries (applied to a copy) always equal the table's held entries.
TEST(kv_pages, random_interleaving_keeps_the_tables_consistent) {
    std::mt19937  rng(7);
    kv_page_table t;
    const int64_t n_seq = 9, max_pages = 12, P = 4;
    ASSERT_TRUE(t.layout(n_seq, max_pages, 40, P).is_ok());
    std::vector<int32_t> device(size_t(n_seq * max_pages), k_kv_page_none);
    std::vector<int64_t> pos(size_t(n_seq), 0);
    for (int step = 0; step < 2000; ++step) {
        const int64_t s = int64_t(rng() % n_seq);
        if (rng() % 7 == 0) {
            t.release(s);
            pos[size_t(s)] = 0;
        } else {
            const int64_t want = std::min<int64_t>(max_pages * P, pos[size_t(s)] + 1 + int64_t(rng() % 9));
            const int64_t need = t.pages_needed(s, want), free = t.n_free();
            const status  st = t.grow(s, want);
            ASSERT_EQ(st.is_ok(), need <= free) << st.message();
            if (st.is_ok()) pos[size_t(s)] = want;
        }
        for (const auto& [b, e] : t.dirty_take()) std::copy(t.table() + b, t.table() + e, device.begin() + b);
        expect_consistent(t);
        for (int64_t q = 0; q < n_seq; ++q)
            for (int64_t j = 0; j < t.pages_for(pos[size_t(q)]); ++j)
                ASSERT_EQ(device[size_t(q * max_pages + j)], t.table()[q * max_pages + j]) << "step " << step;
    }
}

TEST(kv_pages, layout_checks_its_values) {
    kv_page_table t;
    EXPECT_NE(t.layout(2, 4, 8, 12).message().find("power of two"), std::string::npos);
    EXPECT_NE(t.layout(2, 4, 8, 0).message().find("power of two"), std::string::npos);
    EXPECT_FALSE(t.layout(-1, 4, 8, 16).is_ok());
    EXPECT_NE(t.layout(1, 4, int64_t(1) << 32, 16).message().find("2^31"), std::string::npos);
    EXPECT_TRUE(t.layout(1, 1, 1, 1).is_ok());
}

// ---- gptq serve's KV memory plan -------------------------------------------------------------------

TEST(serve_plan, paged_pool_shares_the_budget_between_the_slots) {
    serve_kv_inputs in;
    in.n_ctx        = 1000;  // 63 pages of 16
    in.max_seqs     = 64;
    in.per_position = 1024;
    in.page_size    = 16;
    in.paged        = true;
    in.budget       = 16384ull * 200 + 5;  // 200 pages and a bit
    auto p          = serve_kv_plan(in);
    ASSERT_TRUE(p.is_ok()) << p.error().message();
    EXPECT_TRUE(p->paged);
    EXPECT_EQ(p->n_slots, 64);  // every slot, sharing the pages
    EXPECT_EQ(p->n_pages, 200);
    EXPECT_EQ(p->n_fit, 3);  // 200 / 63 full-context sequences
    EXPECT_EQ(p->kv_bytes, 200ull * 16384);
    // A budget beyond every slot's full context: capped there.
    in.budget = uint64_t(1) << 40;
    p         = serve_kv_plan(in);
    ASSERT_TRUE(p.is_ok());
    EXPECT_EQ(p->n_pages, 64 * 63);
    // Fewer pages than --max-seqs: no more slots than pages (a slot needs one to run).
    in.n_ctx  = 16;
    in.budget = 16384ull * 10;
    p         = serve_kv_plan(in);
    ASSERT_TRUE(p.is_ok());
    EXPECT_EQ(p->n_pages, 10);
    EXPECT_EQ(p->n_slots, 10);
    EXPECT_EQ(p->n_fit, 10);
    in.n_ctx = 1000;
    // Not even one full-context sequence: an error naming the budget and --ctx.
    in.budget = 16384ull * 62;
    p         = serve_kv_plan(in);
    ASSERT_FALSE(p.is_ok());
    EXPECT_EQ(p.error().code(), status_code::STATUS_OUT_OF_MEMORY);
    EXPECT_NE(p.error().message().find("--ctx 1000"), std::string::npos) << p.error().message();
}

TEST(serve_plan, per_slot_caches_count_slots_of_the_full_context) {
    serve_kv_inputs in;
    in.n_ctx        = 512;
    in.max_seqs     = 32;
    in.per_position = 100;
    in.page_size    = 16;
    in.paged        = false;
    in.budget       = 512ull * 100 * 5 + 99;
    auto p          = serve_kv_plan(in);
    ASSERT_TRUE(p.is_ok()) << p.error().message();
    EXPECT_EQ(p->n_slots, 5);
    EXPECT_EQ(p->n_fit, 5);
    EXPECT_EQ(p->n_pages, 5 * 32);
    EXPECT_EQ(p->kv_bytes, 5ull * 512 * 100);
    in.budget = 512ull * 100 * 1000;
    p         = serve_kv_plan(in);
    ASSERT_TRUE(p.is_ok());
    EXPECT_EQ(p->n_slots, 32);
    in.budget = 100;
    EXPECT_FALSE(serve_kv_plan(in).is_ok());
}

}  // namespace
}  // namespace gptq
