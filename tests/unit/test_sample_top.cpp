// Sampling on candidates (ops/logits_top.h, sampler::sample_top): the reference candidates' order
// and sums, and that sample_top picks what sample() picks from the whole row, with the same draws,
// over random rows (many ties) and every filter and penalty; that it decides greedy rows alone, and
// where it must hand over to the whole row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gptq/sampler.h"
#include "ops/logits_top.h"

namespace gptq {
namespace {

TEST(LogitsTop, CandidatesInOrderWithTiesByIdAndTheRowsSums) {
    const std::vector<float> row = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f, 2.0f, 0.5f};
    const float              it  = 0.5f;  // temperature 2
    logits_top               t;
    logits_top_cpu(row.data(), 1, 7, 4, &it, &t);
    ASSERT_EQ(t.k, 4);
    EXPECT_EQ(t.ids, (std::vector<int32_t>{1, 3, 2, 5}));
    EXPECT_EQ(t.logits, (std::vector<float>{3.0f, 3.0f, 2.0f, 2.0f}));
    double s1 = 0.0, st = 0.0;
    for (float l : row) s1 += std::exp(double(l) - 3.0), st += std::exp((double(l) - 3.0) * 0.5);
    EXPECT_DOUBLE_EQ(t.sum_exp[0], s1);
    EXPECT_DOUBLE_EQ(t.sum_exp_t[0], st);
    logits_top_cpu(row.data(), 1, 7, 64, nullptr, &t);  // k past the vocabulary: all of it
    EXPECT_EQ(t.k, 7);
    EXPECT_EQ(t.ids.back(), 4);
}

struct random_case {
    int64_t              n_vocab = 0, k = 0;
    sampling_params      p;
    std::vector<int32_t> banned;
    std::vector<int32_t> history;  // prompt ids first
    size_t               n_prompt = 0;
};

random_case make_case(std::mt19937_64& rng) {
    auto pick = [&](auto... v) {
        const std::vector<std::common_type_t<decltype(v)...>> a{v...};
        return a[std::uniform_int_distribution<size_t>(0, a.size() - 1)(rng)];
    };
    random_case c;
    c.n_vocab              = pick(int64_t(40), int64_t(300), int64_t(2000));
    c.k                    = pick(int64_t(1), int64_t(8), int64_t(64), int64_t(256));
    c.p.do_sample          = pick(true, true, true, false);
    c.p.temperature        = pick(0.3f, 0.7f, 1.0f, 1.6f);
    c.p.top_k              = pick(0, 0, 1, 5, 40, 64, 100);
    c.p.top_p              = pick(1.0f, 1.0f, 0.5f, 0.9f, 0.99f);
    c.p.min_p              = pick(0.0f, 0.0f, 0.05f, 0.3f);
    c.p.repetition_penalty = pick(1.0f, 1.0f, 1.3f, 0.8f);
    c.p.presence_penalty   = pick(0.0f, 0.0f, 0.5f, -0.5f);
    c.p.frequency_penalty  = pick(0.0f, 0.0f, 0.3f, -0.3f);
    c.p.seed               = rng();
    std::uniform_int_distribution<int32_t> id(0, int32_t(c.n_vocab - 1));
    for (int i = 0, n = pick(0, 0, 1, 3); i < n; ++i) c.banned.push_back(id(rng));
    c.n_prompt = pick(size_t(0), size_t(1), size_t(10));
    for (size_t i = 0; i < c.n_prompt; ++i) c.history.push_back(id(rng));
    return c;
}

// Logits on a coarse grid (many exact ties) or continuous, with a few very likely tokens at times.
std::vector<float> make_row(std::mt19937_64& rng, int64_t n_vocab, bool ties, float sd = 2.5f) {
    std::normal_distribution<float> nd(0.0f, sd);
    std::vector<float>              l(static_cast<size_t>(n_vocab));
    for (float& x : l) x = ties ? std::round(nd(rng) * 2.0f) / 2.0f : nd(rng);
    if (rng() % 3 == 0) l[rng() % l.size()] += 8.0f;
    return l;
}

// Twenty tokens of one case, the whole-row sampler against the candidates one (falling back to the
// whole row where sample_top says so): the same tokens. Counts what the candidates decided.
void run_case(std::mt19937_64& rng, const random_case& c, int64_t* decided, int64_t* total) {
    sampler              whole(c.p), top(c.p);
    std::vector<int32_t> history = c.history;
    const bool           ties    = rng() % 2 == 0;
    logits_top           t;
    const float          it = c.p.greedy() ? 1.0f : 1.0f / c.p.temperature;
    for (int step = 0; step < 20; ++step) {
        const std::vector<float> row = make_row(rng, c.n_vocab, ties);
        std::vector<float>       a   = row;
        const int32_t            ref = whole.sample(a.data(), c.n_vocab, history, c.banned, c.n_prompt);
        logits_top_cpu(row.data(), 1, c.n_vocab, c.k, &it, &t);
        int32_t got = -1;
        if (top.sample_top(t.ids.data(), t.logits.data(), t.k, c.n_vocab, t.sum_exp_t[0], history, c.banned, c.n_prompt,
                           &got)) {
            ++*decided;
        } else {
            std::vector<float> b = row;
            got                  = top.sample(b.data(), c.n_vocab, history, c.banned, c.n_prompt);
        }
        ++*total;
        ASSERT_EQ(got, ref) << "vocab " << c.n_vocab << " k " << c.k << " do_sample " << c.p.do_sample << " T "
                            << c.p.temperature << " top_k " << c.p.top_k << " top_p " << c.p.top_p << " min_p "
                            << c.p.min_p << " rep " << c.p.repetition_penalty << " presence " << c.p.presence_penalty
                            << " frequency " << c.p.frequency_penalty << " banned " << c.banned.size() << " step "
                            << step << " ties " << ties;
        history.push_back(ref);
    }
}

TEST(SampleTop, PicksWhatTheWholeRowPicksWithTheSameDraws) {
    std::mt19937_64 rng(20261207);
    int64_t         decided = 0, total = 0;
    for (int i = 0; i < 1500; ++i) {
        const random_case c = make_case(rng);
        run_case(rng, c, &decided, &total);
        if (HasFatalFailure()) return;
    }
    // The mix is harsh on purpose (k = 1, flat rows, raising penalties), so many hand over; the
    // candidates must still decide a share of them.
    EXPECT_GT(decided, total / 5) << decided << " of " << total;
}

// A chat-like request (temperature 0.7, top_p 0.9) on rows with a clear favourite (6 above the
// rest, which spread by 1), as a trained language model's mostly are: 64 candidates decide every
// draw.
TEST(SampleTop, TypicalRequestsNeedNoWholeRow) {
    std::mt19937_64 rng(11);
    sampling_params p;
    p.do_sample   = true;
    p.temperature = 0.7f;
    p.top_k       = 0;
    p.top_p       = 0.9f;
    sampler     whole(p), top(p);
    logits_top  t;
    const float it      = 1.0f / p.temperature;
    int         decided = 0;
    for (int i = 0; i < 500; ++i) {
        std::vector<float> row  = make_row(rng, 2000, false, 1.0f);
        row[rng() % row.size()] = *std::max_element(row.begin(), row.end()) + 6.0f;
        std::vector<float> a    = row;
        const int32_t      ref  = whole.sample(a.data(), 2000, {});
        logits_top_cpu(row.data(), 1, 2000, 64, &it, &t);
        int32_t got = -1;
        if (top.sample_top(t.ids.data(), t.logits.data(), t.k, 2000, t.sum_exp_t[0], {}, {}, 0, &got)) {
            ++decided;
        } else {
            std::vector<float> b = row;
            got                  = top.sample(b.data(), 2000, {});
        }
        ASSERT_EQ(got, ref);
    }
    EXPECT_EQ(decided, 500);
}

TEST(SampleTop, GreedyRowsAreDecidedByTheCandidates) {
    std::mt19937_64 rng(7);
    for (int i = 0; i < 300; ++i) {
        const int64_t      n_vocab = 1000;
        std::vector<float> row     = make_row(rng, n_vocab, /*ties=*/false);
        std::vector<float> a       = row;
        sampling_params    p;  // greedy
        sampler            s(p);
        const int32_t      ref = s.sample(a.data(), n_vocab, {});
        logits_top         t;
        logits_top_cpu(row.data(), 1, n_vocab, 2, nullptr, &t);
        int32_t got = -1;
        ASSERT_TRUE(s.sample_top(t.ids.data(), t.logits.data(), t.k, n_vocab, t.sum_exp_t[0], {}, {}, 0, &got));
        EXPECT_EQ(got, ref);
        // Banning the best: the second decides only when it is above the boundary (k = 2: it is it).
        logits_top_cpu(row.data(), 1, n_vocab, 3, nullptr, &t);
        std::vector<float> b          = row;
        const int32_t      second_ref = s.sample(b.data(), n_vocab, {}, {ref});
        ASSERT_TRUE(s.sample_top(t.ids.data(), t.logits.data(), t.k, n_vocab, t.sum_exp_t[0], {}, {ref}, 0, &got));
        EXPECT_EQ(got, second_ref);
    }
}

TEST(SampleTop, HandsOverWhereTheCandidatesCannotDecide) {
    // A flat row: a plain draw at temperature 1 lands past 4 candidates of 100 almost always.
    const int64_t      n_vocab = 100;
    std::vector<float> row(n_vocab, 0.0f);
    sampling_params    p;
    p.do_sample = true;
    p.top_k     = 0;
    p.seed      = 3;
    sampler    s(p), ref(p);
    logits_top t;
    logits_top_cpu(row.data(), 1, n_vocab, 4, nullptr, &t);
    int32_t got = -1;
    EXPECT_FALSE(s.sample_top(t.ids.data(), t.logits.data(), t.k, n_vocab, t.sum_exp_t[0], {}, {}, 0, &got));
    std::vector<float> a = row, b = row;
    EXPECT_EQ(s.sample(a.data(), n_vocab, {}), ref.sample(b.data(), n_vocab, {}));  // the pending draw is used
    // A repetition penalty below 1 raises a seen token outside the candidates: greedy cannot tell.
    sampling_params g;
    g.repetition_penalty = 0.5f;
    sampler greedy(g);
    row[50] = -1.0f;  // raised to -0.5 ... still below the candidates' 0, but the rule is conservative
    logits_top_cpu(row.data(), 1, n_vocab, 4, nullptr, &t);
    EXPECT_FALSE(greedy.sample_top(t.ids.data(), t.logits.data(), t.k, n_vocab, t.sum_exp_t[0], {50}, {}, 0, &got));
}

}  // namespace
}  // namespace gptq
