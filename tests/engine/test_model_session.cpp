// The CPU model_session (engine/model_session.h, docs/engine.md): ragged steps, where sequences sit
// at different positions and prompt chunks mix with decode tokens, give each sequence the logits
// it gets alone; all_logits rows; seq_reset; the step errors (nothing advanced); evaluate is
// llama_model::forward with local K/V; reserve and its memory check; the CUDA session in a build
// without CUDA. Models: tests/data/model/rand-qwen2 (sliding window of 6, q/k/v bias, vocab 96)
// and rand-dynamic (dynamic RoPE: the frequencies depend on each sequence's length).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "engine/model_session.h"
#include "model/llama.h"
#include "step_top_check.h"

using namespace gptq;

namespace {

const std::string k_models  = std::string(GPTQ_SOURCE_DIR) + "/tests/data/model";
constexpr int     k_threads = 2;

// A sequence alone and in a ragged batch runs the same ops on the same values, but the batch's
// linears see more rows, and the optimized matrix kernels may block (and so sum) a row's dot
// products differently with the row count: not bit-identical, within F32 rounding of the sums.
constexpr double k_batch_rel_tol = 1e-5;
// With the F16 KV cache (the session's default) the keys/values of those sums are rounded to F16,
// and one whose F32 value differs in the last bit may land on the neighbouring F16: the F16 cache's
// bound (test_llama's k_f16_cache_rel_tol, which also bounds it against the F32 cache).
constexpr double k_f16_batch_rel_tol = 4e-3;

double row_rel_error(const float* a, const float* b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
        num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
        den = std::max(den, std::fabs(double(b[i])));
    }
    return num / std::max(den, 1e-30);
}

std::unique_ptr<model_session> open_cpu(const std::string& name, bool kv_f16 = true) {
    model_session_options o;
    o.model_path = k_models + "/" + name;
    o.n_threads  = k_threads;
    o.kv_f16     = kv_f16;
    auto s       = model_session_open(o);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    return s.is_ok() ? std::move(*s) : nullptr;
}

std::vector<int32_t> token_ids(int64_t n, int64_t seed, int64_t n_vocab) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
        ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + seed * 11 + 5) % n_vocab);
    return ids;
}

// Each sequence alone: llama_model::forward with its own cache, fed in the same chunks as in the
// ragged steps (dynamic RoPE sets a call's frequencies from the sequence's length at its end, so
// the chunking is part of the answer), the logits of every position, [n, n_vocab].
std::vector<float> alone_logits(const std::string& name, const std::vector<int32_t>& ids,
                                const std::vector<int64_t>& chunks, bool kv_f16) {
    auto m = llama_model::open(k_models + "/" + name);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    thread_pool        pool(k_threads);
    const int64_t      n = static_cast<int64_t>(ids.size()), V = (*m)->hparams().n_vocab;
    kv_cache           c = kv_cache::create((*m)->hparams(), n, kv_f16);
    std::vector<float> out(static_cast<size_t>(n * V));
    for (int64_t k : chunks)
        EXPECT_TRUE((*m)->forward({&pool, false}, ids.data() + c.n_past, k, &c, out.data() + c.n_past * V).is_ok());
    EXPECT_EQ(c.n_past, n);
    return out;
}

// Ragged steps over 3 slots of `name`: positions differ, prompt chunks mix with decode tokens,
// slots sit out steps, one asks for all its logits. Every row is compared with the logits the
// sequence gets alone at that position, fed in the same chunks.
// kv_f16: the session's and the references' caches are F16 (then within k_f16_batch_rel_tol).
void check_ragged_steps(const std::string& name, bool kv_f16) {
    SCOPED_TRACE(name + (kv_f16 ? " (F16 KV cache)" : " (F32 KV cache)"));
    const double tol = kv_f16 ? k_f16_batch_rel_tol : k_batch_rel_tol;
    auto         s   = open_cpu(name, kv_f16);
    ASSERT_TRUE(s);
    const int64_t V = s->n_vocab();
    ASSERT_TRUE(s->reserve(3, 24).is_ok());
    // The tokens of each sequence, fed in chunks: A 5 | 1 | 1 | 1, B 2 | 4 (all logits) | 1, C - | 9 | 1 | 1 | 8.
    const std::vector<std::vector<int32_t>> tok = {token_ids(8, 0, V), token_ids(7, 1, V), token_ids(19, 2, V)};
    struct chunk {
        int64_t seq, n;
        bool    all;
    };
    const std::vector<std::vector<chunk>> plan = {
        {{0, 5, false}, {1, 2, false}},
        {{1, 4, true}, {0, 1, false}, {2, 9, false}},  // out of slot order, all_logits in the middle
        {{2, 1, false}, {0, 1, false}, {1, 1, false}},
        {{0, 1, false}, {2, 1, false}},
        {{2, 8, true}},
    };
    std::vector<std::vector<float>> alone;
    for (int64_t q = 0; q < 3; ++q) {
        std::vector<int64_t> chunks;
        for (const auto& step : plan)
            for (const chunk& c : step)
                if (c.seq == q) chunks.push_back(c.n);
        alone.push_back(alone_logits(name, tok[size_t(q)], chunks, kv_f16));
    }

    std::vector<int64_t> fed(3, 0);
    for (size_t k = 0; k < plan.size(); ++k) {
        std::vector<seq_step> steps;
        int64_t               rows = 0;
        for (const chunk& c : plan[k]) {
            steps.push_back({.seq        = c.seq,
                             .ids        = tok[size_t(c.seq)].data() + fed[size_t(c.seq)],
                             .n_tokens   = c.n,
                             .all_logits = c.all});
            rows += c.all ? c.n : 1;
        }
        std::vector<float> logits(static_cast<size_t>(rows * V), NAN);
        ASSERT_TRUE(s->step(steps, logits.data()).is_ok()) << "step " << k;
        int64_t row = 0;
        for (const chunk& c : plan[k]) {
            const int64_t first = c.all ? fed[size_t(c.seq)] : fed[size_t(c.seq)] + c.n - 1;
            for (int64_t p = first; p < fed[size_t(c.seq)] + c.n; ++p, ++row) {
                const double err = row_rel_error(logits.data() + row * V, alone[size_t(c.seq)].data() + p * V, V);
                EXPECT_LE(err, tol) << "step " << k << ", slot " << c.seq << ", position " << p;
            }
            fed[size_t(c.seq)] += c.n;
            EXPECT_EQ(s->seq_pos(c.seq), fed[size_t(c.seq)]) << "step " << k;
        }
        EXPECT_EQ(row, rows);
    }
}

}  // namespace

TEST(model_session_cpu, ragged_steps_match_each_sequence_alone) {
    for (bool kv_f16 : {false, true}) {
        check_ragged_steps("rand-qwen2", kv_f16);    // sliding window: positions past the window of 6
        check_ragged_steps("rand-dynamic", kv_f16);  // dynamic RoPE: each sequence's length sets its frequencies
    }
}

TEST(model_session_cpu, step_top_gives_the_candidates_of_steps_logits) {
    test::check_step_top([] { return open_cpu("rand-qwen2"); }, 64);
    test::check_step_top([] { return open_cpu("rand-qwen2"); }, 256);  // past the vocabulary of 96: all of it
}

TEST(model_session_cpu, describes_itself) {
    auto s = open_cpu("rand-qwen2");
    ASSERT_TRUE(s);
    EXPECT_EQ(s->device(), "cpu");
    EXPECT_TRUE(s->ragged());
    EXPECT_EQ(s->n_threads(), k_threads);
    EXPECT_EQ(s->weights(), "bfloat16");
    EXPECT_EQ(s->n_vocab(), 96);
    EXPECT_EQ(s->memory_kind(), "host_rss");
    EXPECT_GT(s->memory_used(), 0u);
    // What one position costs is what the session's KV cache allocates for it (F16 K and V, every layer).
    const kv_cache one = kv_cache::create(s->hparams(), 1, /*f16=*/true);
    uint64_t       kv  = 0;
    for (size_t l = 0; l < one.k16.size(); ++l) kv += (one.k16[l].size() + one.v16[l].size()) * sizeof(uint16_t);
    EXPECT_GT(kv, 0u);
    EXPECT_EQ(s->kv_bytes_per_position(), kv);
    EXPECT_EQ(2 * s->kv_bytes_per_position(), kv_cache::bytes_per_position(s->hparams(), /*f16=*/false));
    EXPECT_EQ(s->n_seq(), 0);
    auto st = s->profile_ops(true);  // the GPU's op timing
    EXPECT_EQ(st.code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_NE(st.message().find("--device cuda"), std::string::npos) << st.message();
}

TEST(model_session_cpu, seq_reset_starts_one_slot_over) {
    auto s = open_cpu("rand-qwen2", /*kv_f16=*/false);  // F32 cache: the same logits within k_batch_rel_tol
    ASSERT_TRUE(s);
    const int64_t              V = s->n_vocab();
    const std::vector<int32_t> a = token_ids(6, 3, V), b = token_ids(4, 4, V);
    ASSERT_TRUE(s->reserve(2, 16).is_ok());
    std::vector<float> first(static_cast<size_t>(2 * V)), again(first.size());
    const seq_step both[] = {{.seq = 0, .ids = a.data(), .n_tokens = 6}, {.seq = 1, .ids = b.data(), .n_tokens = 4}};
    ASSERT_TRUE(s->step(both, first.data()).is_ok());
    s->seq_reset(1);
    EXPECT_EQ(s->seq_pos(0), 6);
    EXPECT_EQ(s->seq_pos(1), 0);
    // Slot 1 from position 0 again beside slot 0 (now at 6, running its next token): b's logits
    // as the first time.
    const int32_t  next    = 9;
    const seq_step mixed[] = {{.seq = 1, .ids = b.data(), .n_tokens = 4}, {.seq = 0, .ids = &next, .n_tokens = 1}};
    ASSERT_TRUE(s->step(mixed, again.data()).is_ok());
    EXPECT_LE(row_rel_error(again.data(), first.data() + V, V), k_batch_rel_tol);
    EXPECT_EQ(s->seq_pos(0), 7);
    EXPECT_EQ(s->seq_pos(1), 4);
    s->seq_reset(7);  // an unknown slot: nothing
    EXPECT_EQ(s->seq_pos(7), -1);
    EXPECT_EQ(s->seq_pos(-1), -1);

    // reserve with the same room forgets every sequence; another room reallocates; 0 drops all.
    ASSERT_TRUE(s->reserve(2, 16).is_ok());
    EXPECT_EQ(s->seq_pos(0), 0);
    EXPECT_EQ(s->seq_pos(1), 0);
    ASSERT_TRUE(s->reserve(3, 8).is_ok());
    EXPECT_EQ(s->n_seq(), 3);
    EXPECT_EQ(s->n_ctx(), 8);
    ASSERT_TRUE(s->reserve(0, 0).is_ok());
    EXPECT_EQ(s->n_seq(), 0);
    EXPECT_FALSE(s->reserve(-1, 8).is_ok());
    EXPECT_FALSE(s->reserve(2, 0).is_ok());
    // The CPU has no KV pages (one cache per slot): a pool size is ignored, every slot gets its
    // full context (docs/engine.md).
    EXPECT_EQ(s->kv_page_size(), 0);
    ASSERT_TRUE(s->reserve_paged(2, 16, 1).is_ok());
    EXPECT_EQ(s->n_seq(), 2);
    EXPECT_EQ(s->n_ctx(), 16);
    const std::vector<int32_t> full        = token_ids(16, 5, V);
    const seq_step             both_full[] = {{.seq = 0, .ids = full.data(), .n_tokens = 16},
                                              {.seq = 1, .ids = full.data(), .n_tokens = 16}};
    EXPECT_TRUE(s->step(both_full, again.data()).is_ok());
}

TEST(model_session_cpu, step_errors_name_the_slot_and_advance_nothing) {
    auto s = open_cpu("rand-qwen2");
    ASSERT_TRUE(s);
    const int64_t              V   = s->n_vocab();
    const std::vector<int32_t> ids = token_ids(8, 5, V);
    std::vector<float>         logits(static_cast<size_t>(4 * 8 * V));
    {
        const seq_step one[] = {{.seq = 0, .ids = ids.data(), .n_tokens = 2}};
        auto           st    = s->step(one, logits.data());  // nothing reserved yet
        ASSERT_FALSE(st.is_ok());
        EXPECT_NE(st.message().find("reserve"), std::string::npos) << st.message();
    }
    ASSERT_TRUE(s->reserve(2, 8).is_ok());
    const seq_step warm[] = {{.seq = 0, .ids = ids.data(), .n_tokens = 3}};
    ASSERT_TRUE(s->step(warm, logits.data()).is_ok());

    const int32_t bad_high = static_cast<int32_t>(V), bad_low = -1;
    struct bad_case {
        const char*           what;
        std::vector<seq_step> steps;
        std::string           expect;  // in the message
    };
    const std::vector<bad_case> cases = {
        {"unknown slot", {{.seq = 2, .ids = ids.data(), .n_tokens = 1}}, "slot 2 is not one of the 2 reserved"},
        {"negative slot", {{.seq = -1, .ids = ids.data(), .n_tokens = 1}}, "slot -1"},
        {"repeated slot",
         {{.seq = 1, .ids = ids.data(), .n_tokens = 1}, {.seq = 1, .ids = ids.data(), .n_tokens = 1}},
         "slot 1 is listed twice"},
        {"no tokens", {{.seq = 1, .ids = ids.data(), .n_tokens = 0}}, "slot 1 has 0 new tokens"},
        {"no ids", {{.seq = 1, .ids = nullptr, .n_tokens = 2}}, "no ids"},
        {"past n_ctx",
         {{.seq = 0, .ids = ids.data(), .n_tokens = 6}},
         "slot 0: 6 tokens after its 3 cached positions exceed the 8"},
        {"id past the vocabulary",
         {{.seq = 1, .ids = ids.data(), .n_tokens = 1}, {.seq = 0, .ids = &bad_high, .n_tokens = 1}},
         "slot 0, token 0 of 1: id 96 is outside the vocabulary [0, 96)"},
        {"negative id", {{.seq = 1, .ids = &bad_low, .n_tokens = 1}}, "id -1 is outside"},
    };
    for (const auto& c : cases) {
        auto st = s->step(c.steps, logits.data());
        ASSERT_FALSE(st.is_ok()) << c.what;
        EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT) << c.what;
        EXPECT_NE(st.message().find(c.expect), std::string::npos) << c.what << ": " << st.message();
        EXPECT_EQ(s->seq_pos(0), 3) << c.what;  // nothing advanced
        EXPECT_EQ(s->seq_pos(1), 0) << c.what;
    }
    const seq_step fits[] = {{.seq = 0, .ids = ids.data(), .n_tokens = 5}};  // exactly to n_ctx
    EXPECT_TRUE(s->step(fits, logits.data()).is_ok());
    EXPECT_EQ(s->seq_pos(0), 8);
    EXPECT_TRUE(s->step({}, logits.data()).is_ok());  // an empty step: nothing to do
}

TEST(model_session_cpu, evaluate_is_forward_with_local_kv_and_leaves_the_slots) {
    auto s = open_cpu("rand-qwen2");
    ASSERT_TRUE(s);
    const int64_t              V = s->n_vocab(), n = 12;
    const std::vector<int32_t> ids = token_ids(n, 6, V);
    ASSERT_TRUE(s->reserve(1, 16).is_ok());
    const seq_step     warm[] = {{.seq = 0, .ids = ids.data(), .n_tokens = 4}};
    std::vector<float> before(static_cast<size_t>(V)), after(before.size());
    ASSERT_TRUE(s->step(warm, before.data()).is_ok());

    std::vector<float> got(static_cast<size_t>(n * V)), want(got.size());
    ASSERT_TRUE(s->evaluate(ids.data(), n, got.data()).is_ok());
    auto m = llama_model::open(k_models + "/rand-qwen2");
    ASSERT_TRUE(m.is_ok());
    thread_pool pool(k_threads);  // the session's kernels and thread count: the same bits
    ASSERT_TRUE((*m)->forward({&pool, false}, ids.data(), n, nullptr, want.data()).is_ok());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)));

    EXPECT_EQ(s->seq_pos(0), 4);  // the slot is untouched: its next token as without evaluate
    const seq_step next[] = {{.seq = 0, .ids = ids.data() + 4, .n_tokens = 1}};
    ASSERT_TRUE(s->step(next, after.data()).is_ok());
    EXPECT_LE(row_rel_error(after.data(), want.data() + 4 * V, V), k_f16_batch_rel_tol);  // F16 cache vs local F32

    const int32_t bad = 1000;
    auto          st  = s->evaluate(&bad, 1, got.data());
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("evaluate, token 0 of 1: id 1000"), std::string::npos) << st.message();
    EXPECT_FALSE(s->evaluate(ids.data(), 0, got.data()).is_ok());
}

TEST(model_session_cpu, reserve_checks_host_memory_and_reserves_nothing_when_short) {
    auto s = open_cpu("rand-qwen2");
    ASSERT_TRUE(s);
    ASSERT_TRUE(s->reserve(1, 4).is_ok());
    setenv("GPTQ_MEMORY_LIMIT_BYTES", "4096", 1);
    auto st = s->reserve(4, 64);  // 4 x 64 positions x 2 layers x kv_dim 16 x 2 x 2 bytes (F16 K, V) = 32 KiB
    unsetenv("GPTQ_MEMORY_LIMIT_BYTES");
    ASSERT_FALSE(st.is_ok());
    EXPECT_EQ(st.code(), status_code::STATUS_OUT_OF_MEMORY);
    EXPECT_NE(st.message().find("KV cache of 4 sequences x 64 positions"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("32.00 KiB"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("F16 keys and values"), std::string::npos) << st.message();
    EXPECT_EQ(s->n_seq(), 0);
}

TEST(model_session, open_checks_the_device_and_placement) {
    model_session_options o;
    o.model_path = k_models + "/rand-qwen2";
    o.device_map = "auto";  // GPU placement with --device cpu
    auto s       = model_session_open(o);
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.error().message().find("--device-map and --max-memory"), std::string::npos) << s.error().message();

    o.device_map = "";
    o.n_threads  = -1;
    EXPECT_FALSE(model_session_open(o).is_ok());

    // Without CUDA in the build (or without the device), --device cuda is device_check's error.
    o.n_threads     = 1;
    o.device        = {.cuda = true, .index = 7};
    const status dc = device_check(o.device);
    if (dc.is_ok()) GTEST_SKIP() << "this machine has a cuda:7";
    s = model_session_open(o);
    ASSERT_FALSE(s.is_ok());
    EXPECT_EQ(s.error().message(), dc.message());
}
