// The serve scheduler (src/engine/serve_scheduler.h) over a test double of model_session whose
// logits are a hash of each sequence's own tokens: batching, chunked prefill, slot and KV page
// accounting, stop strings, EOS, max_tokens capped to the context, cancellation and drain.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <thread>

#include "engine/serve_scheduler.h"
#include "engine/stop_text.h"

namespace gptq {
namespace {

using namespace std::chrono_literals;

constexpr int64_t k_vocab = 64;

// Each slot's state is a hash of every token it has run; the logits of a row depend on that state
// only, so a sequence's outputs do not depend on its batch. It checks the seam's contract: each
// slot at most once a step, positions within n_ctx, ids in the vocabulary.
class fake_session : public model_session {
public:
    const llama_hparams& hparams() const override { return hp_; }
    const llama_model&   model() const override { std::abort(); }
    std::string          device() const override { return "fake"; }
    std::string          describe() const override { return "fake"; }
    int                  n_threads() const override { return 1; }
    bool                 ragged() const override { return true; }
    status               reserve(int64_t n_seq, int64_t n_ctx) override {
        n_seq_ = n_seq, n_ctx_ = n_ctx;
        hash_.assign(static_cast<size_t>(n_seq), 0);
        pos_.assign(static_cast<size_t>(n_seq), 0);
        return status::ok();
    }
    int64_t n_seq() const override { return n_seq_; }
    int64_t n_ctx() const override { return n_ctx_; }
    void    seq_reset(int64_t s) override {
        std::lock_guard lk(mu_);
        hash_[static_cast<size_t>(s)] = 0, pos_[static_cast<size_t>(s)] = 0;
    }
    int64_t seq_pos(int64_t s) const override {
        std::lock_guard lk(mu_);
        return pos_[static_cast<size_t>(s)];
    }
    status step(std::span<const seq_step> steps, float* logits) override {
        std::lock_guard   lk(mu_);
        std::set<int64_t> seen;
        for (const auto& st : steps) {
            if (st.seq < 0 || st.seq >= n_seq_ || !seen.insert(st.seq).second || st.n_tokens < 1)
                return status(status_code::STATUS_INVALID_ARGUMENT, "bad step");
            if (pos_[static_cast<size_t>(st.seq)] + st.n_tokens > n_ctx_)
                return status(status_code::STATUS_INVALID_ARGUMENT, "past n_ctx");
        }
        ++n_steps;
        if (step_delay.count() > 0) std::this_thread::sleep_for(step_delay);
        max_batch = std::max<int64_t>(max_batch, static_cast<int64_t>(steps.size()));
        for (size_t r = 0; r < steps.size(); ++r) {
            const auto& st = steps[r];
            uint64_t&   h  = hash_[static_cast<size_t>(st.seq)];
            for (int64_t i = 0; i < st.n_tokens; ++i) {
                if (st.ids[i] < 0 || st.ids[i] >= k_vocab) return status(status_code::STATUS_INVALID_ARGUMENT, "id");
                h = (h ^ static_cast<uint64_t>(st.ids[i] + 1)) * 0x100000001b3ull;
            }
            max_chunk = std::max(max_chunk, st.n_tokens);
            pos_[static_cast<size_t>(st.seq)] += st.n_tokens;
            for (int64_t v = 0; v < k_vocab; ++v) {
                uint64_t x = (h + static_cast<uint64_t>(v) * 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull;
                x ^= x >> 29;
                logits[r * k_vocab + v] = static_cast<float>(x % 10007) / 1000.0f;
            }
        }
        return status::ok();
    }
    status      evaluate(const int32_t*, int64_t, float*, int32_t) override { return status::ok(); }
    uint64_t    memory_used() const override { return 0; }
    void        memory_reset_peak() override {}
    std::string memory_kind() const override { return "none"; }
    uint64_t    kv_bytes_per_position() const override { return 8; }
    uint64_t    memory_available() const override { return 0; }

    int64_t                   n_steps = 0, max_batch = 0, max_chunk = 0;
    std::chrono::microseconds step_delay{0};  // a slower model, for races with the client

    fake_session() { hp_.n_vocab = k_vocab; }

private:
    llama_hparams         hp_;
    mutable std::mutex    mu_;
    int64_t               n_seq_ = 0, n_ctx_ = 0;
    std::vector<uint64_t> hash_;
    std::vector<int64_t>  pos_;
};

// Token i is the text "<i>"; token 0 is EOS.
class fake_decoder : public serve_decoder {
public:
    std::string step(int32_t id) override { return id == 0 ? "" : "<" + std::to_string(id) + ">"; }
    std::string finish() override { return ""; }
};
class fake_vocab : public serve_vocab {
public:
    std::unique_ptr<serve_decoder> new_decoder(int32_t) const override { return std::make_unique<fake_decoder>(); }
    const std::vector<int32_t>&    eos_ids() const override { return eos_; }
    std::vector<int32_t>           eos_{0};
};

struct outcome {
    std::string          text, finish;
    std::vector<int32_t> tokens;
    int64_t              n_prompt = 0, n_generated = 0, n_events = 0;
};

outcome collect(serve_stream& s) {
    outcome     o;
    serve_event e;
    while (s.next(e, 10s)) {
        ++o.n_events;
        o.text += e.text;
        o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
        if (e.finished) {
            o.finish      = e.finish_reason;
            o.n_prompt    = e.n_prompt;
            o.n_generated = e.n_generated;
            return o;
        }
    }
    o.finish = "timeout";
    return o;
}

serve_request request(int64_t n_prompt, int64_t max_tokens, int32_t first = 1) {
    serve_request r;
    for (int64_t i = 0; i < n_prompt; ++i)
        r.prompt.push_back(static_cast<int32_t>(1 + (first + i * 7) % (k_vocab - 1)));
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
}

struct fixture {
    fake_session    session;
    fake_vocab      vocab;
    serve_scheduler sch;
    fixture(int64_t n_seq, int64_t n_ctx, serve_scheduler_options o = {})
        : sch(reserved(session, n_seq, n_ctx), vocab, o) {}
    static fake_session& reserved(fake_session& s, int64_t n_seq, int64_t n_ctx) {
        (void)s.reserve(n_seq, n_ctx);
        return s;
    }
};

outcome alone(const serve_request& r, int64_t n_ctx = 256, serve_scheduler_options o = {}) {
    fixture f(1, n_ctx, o);
    auto    s = f.sch.submit(r);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    return collect(**s);
}

TEST(ServeScheduler, OneRequestGreedyRunsToMaxTokens) {
    const outcome o = alone(request(5, 7));
    EXPECT_EQ(o.finish, "length");
    EXPECT_EQ(o.n_prompt, 5);
    EXPECT_EQ(o.n_generated, 7);
    EXPECT_EQ(o.tokens.size(), 7u);
}

TEST(ServeScheduler, ConcurrentRequestsEqualEachAloneAndPagesReturnToZero) {
    std::vector<serve_request> reqs;
    for (int i = 0; i < 24; ++i) reqs.push_back(request(3 + i * 5, 4 + i % 9, i));
    std::vector<outcome> solo;
    for (const auto& r : reqs) solo.push_back(alone(r));

    serve_scheduler_options o;
    o.prefill_chunk = 16;          // long prompts run over several steps, beside decodes
    fixture f(8, 256, o);          // fewer slots than requests: some wait
    f.session.step_delay = 200us;  // the submissions below land while the first steps run
    std::vector<std::shared_ptr<serve_stream>> streams;
    for (const auto& r : reqs) {
        auto s = f.sch.submit(r);
        ASSERT_TRUE(s.is_ok()) << s.error().message();
        streams.push_back(*s);
    }
    for (size_t i = 0; i < reqs.size(); ++i) {
        const outcome o = collect(*streams[i]);
        EXPECT_EQ(o.tokens, solo[i].tokens) << "request " << i;
        EXPECT_EQ(o.finish, "length");
    }
    f.sch.drain();
    const serve_metrics m = f.sch.metrics();
    EXPECT_EQ(m.running, 0);
    EXPECT_EQ(m.waiting, 0);
    EXPECT_EQ(m.pages_used, 0);
    EXPECT_EQ(m.pages_reserved, 0);
    EXPECT_EQ(m.finished_length, 24);
    EXPECT_GT(f.session.max_batch, 1);  // batched for real
    EXPECT_LE(f.session.max_batch, 8);
    EXPECT_LE(f.session.max_chunk, 16);
    for (int64_t s = 0; s < 8; ++s) EXPECT_EQ(f.session.seq_pos(s), 0);
}

TEST(ServeScheduler, ChunkedPrefillGivesTheSameTokens) {
    serve_scheduler_options small;
    small.prefill_chunk   = 3;
    const serve_request r = request(40, 6);
    EXPECT_EQ(alone(r, 256, small).tokens, alone(r).tokens);
}

TEST(ServeScheduler, MaxTokensCappedToTheContext) {
    const outcome o = alone(request(10, 1000), /*n_ctx=*/32);
    EXPECT_EQ(o.finish, "length");
    EXPECT_EQ(o.n_generated, 22);  // prompt + generated == n_ctx
}

TEST(ServeScheduler, PromptAsLongAsTheContextIsRefused) {
    fixture f(1, 32);
    auto    s = f.sch.submit(request(32, 1));
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.error().message().find("context is 32"), std::string::npos) << s.error().message();
    serve_request bad = request(3, 1);
    bad.prompt[1]     = k_vocab;
    EXPECT_FALSE(f.sch.submit(bad).is_ok());
    EXPECT_FALSE(f.sch.submit(request(0, 1)).is_ok());
}

TEST(ServeScheduler, StopAtEosWhenNotIgnored) {
    // A request whose greedy continuation reaches EOS (id 0) stops there; with ignore_eos the same
    // tokens come first, then EOS is never picked.
    for (int first = 0; first < 200; ++first) {
        serve_request r = request(4, 60, first);
        r.ignore_eos    = false;
        const outcome b = alone(r);
        if (b.finish != "stop") continue;
        ASSERT_FALSE(b.tokens.empty());
        EXPECT_EQ(b.tokens.back(), 0);
        r.ignore_eos    = true;
        const outcome a = alone(r);
        EXPECT_EQ(std::vector<int32_t>(a.tokens.begin(), a.tokens.begin() + (b.tokens.size() - 1)),
                  std::vector<int32_t>(b.tokens.begin(), b.tokens.end() - 1));
        EXPECT_EQ(std::count(a.tokens.begin(), a.tokens.end(), 0), 0);
        EXPECT_EQ(a.finish, "length");
        return;
    }
    FAIL() << "no greedy continuation reached EOS in 200 prompts";
}

TEST(ServeScheduler, StopStringEndsTheTextBeforeIt) {
    const outcome a = alone(request(4, 12));
    ASSERT_GE(a.tokens.size(), 6u);
    const std::string stop = "<" + std::to_string(a.tokens[4]) + ">";  // the 5th token's text
    serve_request     r    = request(4, 12);
    r.stop                 = {"never-there", stop};
    const outcome b        = alone(r);
    EXPECT_EQ(b.finish, "stop");
    EXPECT_EQ(b.text, a.text.substr(0, a.text.find(stop)));
    EXPECT_LE(b.tokens.size(), 5u);
}

TEST(ServeScheduler, SeededSamplingIsReproducibleAndSeedsDiffer) {
    serve_request r        = request(6, 20);
    r.sampling.do_sample   = true;
    r.sampling.temperature = 1.5f;
    r.sampling.top_k       = 0;
    r.sampling.seed        = 7;
    const outcome a        = alone(r);
    const outcome b        = alone(r);
    r.sampling.seed        = 8;
    const outcome c        = alone(r);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_NE(a.tokens, c.tokens);
}

TEST(ServeScheduler, LogprobsAreLogSoftmaxWithTopAlternatives) {
    fixture       f(1, 64);
    serve_request r = request(3, 3);
    r.logprobs      = 4;
    auto s          = f.sch.submit(r);
    ASSERT_TRUE(s.is_ok());
    serve_event e;
    int         n = 0;
    while ((*s)->next(e, 10s) && !e.finished) {
        ASSERT_EQ(e.logprobs.size(), 1u);
        const auto& lp = e.logprobs[0];
        EXPECT_EQ(lp.id, e.tokens[0]);
        ASSERT_EQ(lp.top.size(), 4u);
        EXPECT_EQ(lp.top[0].first, lp.id);  // greedy picks the most likely
        EXPECT_FLOAT_EQ(lp.top[0].second, lp.logprob);
        EXPECT_LT(lp.logprob, 0.0f);
        for (size_t i = 1; i < lp.top.size(); ++i) EXPECT_LE(lp.top[i].second, lp.top[i - 1].second);
        ++n;
    }
    EXPECT_EQ(n, 3);
}

TEST(ServeScheduler, CancelFreesTheSlotAtTheNextStep) {
    fixture f(1, 4096);
    f.session.step_delay = 1ms;  // 4000 steps take seconds: the cancel lands while it runs
    auto s               = f.sch.submit(request(4, 4000));
    ASSERT_TRUE(s.is_ok());
    serve_event e;
    ASSERT_TRUE((*s)->next(e, 10s));  // running
    (*s)->cancel();
    const outcome o = collect(**s);
    EXPECT_EQ(o.finish, "cancelled");
    // The slot is free again: the next request runs to its end.
    auto s2 = f.sch.submit(request(4, 3));
    ASSERT_TRUE(s2.is_ok());
    EXPECT_EQ(collect(**s2).finish, "length");
    f.sch.drain();
    EXPECT_EQ(f.sch.metrics().pages_reserved, 0);
    EXPECT_EQ(f.sch.metrics().finished_cancelled, 1);
}

TEST(ServeScheduler, PagesLimitAdmissionNotSlots) {
    serve_scheduler_options o;
    o.page_size = 16;
    o.n_pages   = 3;  // 48 positions in all: requests of 32 positions (2 pages) run one at a time
    fixture                                    f(4, 64, o);
    std::vector<std::shared_ptr<serve_stream>> streams;
    for (int i = 0; i < 3; ++i) streams.push_back(*f.sch.submit(request(8, 24, i)));
    for (auto& s : streams) EXPECT_EQ(collect(*s).finish, "length");
    EXPECT_EQ(f.session.max_batch, 1);
    auto too_big = f.sch.submit(request(8, 60));  // capped to the context: 64 positions, 4 pages > 3
    ASSERT_FALSE(too_big.is_ok());
    EXPECT_NE(too_big.error().message().find("need 4 KV pages"), std::string::npos) << too_big.error().message();
}

TEST(ServeScheduler, DrainRefusesNewRequestsAndFinishesRunning) {
    fixture f(2, 256);
    auto    s = f.sch.submit(request(5, 50));
    ASSERT_TRUE(s.is_ok());
    std::thread   t([&] { f.sch.drain(); });
    const outcome o = collect(**s);
    t.join();
    EXPECT_EQ(o.finish, "length");
    EXPECT_EQ(o.n_generated, 50);
    auto late = f.sch.submit(request(5, 5));
    ASSERT_FALSE(late.is_ok());
    EXPECT_EQ(late.error().code(), status_code::STATUS_CANCELLED);
}

TEST(StopText, HoldsBackAPossibleStopStringAndCutsAtIt) {
    stop_text t({"END"});
    EXPECT_EQ(t.push("abc"), "a");  // the last len("END") - 1 bytes are held back
    EXPECT_EQ(t.push("dE"), "bc");
    EXPECT_EQ(t.push("N"), "d");
    EXPECT_EQ(t.push("Dxyz"), "");
    EXPECT_TRUE(t.stopped());
    EXPECT_EQ(t.text(), "abcd");
    stop_text u({});
    EXPECT_EQ(u.push("abc"), "abc");
    stop_text w({"zz"});
    EXPECT_EQ(w.push("ab"), "a");
    EXPECT_EQ(w.push("c", /*final=*/true), "bc");
}

}  // namespace
}  // namespace gptq
