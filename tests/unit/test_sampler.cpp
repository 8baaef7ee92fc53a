// The sampler (include/gptq/sampler.h) on hand-made logits: greedy and its ties, the repetition
// penalty's arithmetic, which tokens each filter keeps (top-k, top-p, min-p, banned), that draws
// follow the renormalised distribution, and that a seed fixes the draws.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "gptq/sampler.h"

namespace gptq {
namespace {

// Logits whose softmax is exactly `probs`.
std::vector<float> logits_of(const std::vector<double>& probs) {
    std::vector<float> l;
    for (double p : probs) l.push_back(p > 0 ? static_cast<float>(std::log(p)) : -INFINITY);
    return l;
}

// Frequencies of each id over n draws.
std::vector<double> draw(const sampling_params& p, const std::vector<double>& probs, int n) {
    sampler             s(p);
    std::vector<double> freq(probs.size(), 0.0);
    for (int i = 0; i < n; ++i) {
        auto l = logits_of(probs);
        freq[static_cast<size_t>(s.sample(l.data(), static_cast<int64_t>(l.size()), {}))] += 1.0 / n;
    }
    return freq;
}

sampling_params plain(float temperature = 1.0f) {
    sampling_params p;
    p.do_sample          = true;  // temperature 0 is greedy all the same
    p.temperature        = temperature;
    p.top_k              = 0;
    p.top_p              = 1.0f;
    p.min_p              = 0.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

// 20000 draws: a frequency's standard deviation is at most sqrt(0.25 / 20000) = 0.0035, so 0.015 is
// over 4 sigma (no flaky failures), while every wrong filter below moves some frequency by >= 0.05.
constexpr int    k_draws    = 20000;
constexpr double k_freq_tol = 0.015;

void expect_freq(const std::vector<double>& got, const std::vector<double>& want, const char* what) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
        if (want[i] == 0.0)
            EXPECT_EQ(got[i], 0.0) << what << ": id " << i << " must never be drawn";
        else
            EXPECT_NEAR(got[i], want[i], k_freq_tol) << what << ": id " << i;
    }
}

TEST(Sampler, GreedyIsArgmaxWithFirstIndexOnTies) {
    sampler            s(plain(0.0f));
    std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
    EXPECT_EQ(s.sample(l.data(), 4, {}), 1);
    l = {0.5f, 2.0f, -1.0f, 2.0f};
    EXPECT_EQ(s.sample(l.data(), 4, {}, {1}), 3) << "banned id";
}

TEST(Sampler, RepetitionPenaltyAsTransformers) {
    sampling_params p    = plain(0.0f);
    p.repetition_penalty = 2.0f;
    sampler            s(p);
    std::vector<float> l = {3.0f, -1.0f, 2.5f, 0.5f};
    // ids 0 and 1 seen (0 twice: penalised once): 3 -> 1.5, -1 -> -2; the argmax becomes id 2.
    EXPECT_EQ(s.sample(l.data(), 4, {0, 1, 0}), 2);
    EXPECT_FLOAT_EQ(l[0], 1.5f);
    EXPECT_FLOAT_EQ(l[1], -2.0f);
    EXPECT_FLOAT_EQ(l[2], 2.5f);
    EXPECT_FLOAT_EQ(l[3], 0.5f);
}

TEST(Sampler, PresenceAndFrequencyPenaltiesAsOpenAI) {
    // logit -= frequency * count + presence, over the generated ids only (history[n_prompt, end)).
    sampling_params p   = plain(0.0f);
    p.presence_penalty  = 0.25f;
    p.frequency_penalty = 0.5f;
    sampler            s(p);
    std::vector<float> l = {2.4f, 2.0f, 1.0f};
    EXPECT_EQ(s.sample(l.data(), 3, {0, 0, 1, 0}, {}, /*n_prompt=*/1), 1);  // generated: 0, 1, 0
    EXPECT_FLOAT_EQ(l[0], 2.4f - 2 * 0.5f - 0.25f);
    EXPECT_FLOAT_EQ(l[1], 2.0f - 0.5f - 0.25f);
    EXPECT_FLOAT_EQ(l[2], 1.0f);
    l = {2.4f, 2.0f, 1.0f};
    EXPECT_EQ(s.sample(l.data(), 3, {0, 0, 1, 0}, {}, /*n_prompt=*/4), 0) << "the prompt is not penalised";
    EXPECT_FLOAT_EQ(l[0], 2.4f);
}

TEST(Sampler, FiltersKeepTheRightTokens) {
    const std::vector<double> probs = {0.05, 0.5, 0.15, 0.3};
    expect_freq(draw(plain(), probs, k_draws), probs, "no filter");

    sampling_params k = plain();
    k.top_k           = 2;  // ids 1, 3
    expect_freq(draw(k, probs, k_draws), {0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8}, "top-k 2");

    sampling_params p = plain();
    p.top_p           = 0.7f;  // 1 (mass before: 0), 3 (0.5 < 0.7); 2 has 0.8 before it: dropped
    expect_freq(draw(p, probs, k_draws), {0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8}, "top-p 0.7");
    p.top_p = 0.85f;  // 2 kept (0.8 < 0.85), 0 dropped (0.95)
    expect_freq(draw(p, probs, k_draws), {0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95}, "top-p 0.85");

    sampling_params m = plain();
    m.min_p           = 0.25f;  // threshold 0.125: id 0 dropped
    expect_freq(draw(m, probs, k_draws), {0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95}, "min-p 0.25");

    sampling_params t = plain(0.5f);  // p^2, renormalised
    const double    z = 0.05 * 0.05 + 0.5 * 0.5 + 0.15 * 0.15 + 0.3 * 0.3;
    expect_freq(draw(t, probs, k_draws), {0.0025 / z, 0.25 / z, 0.0225 / z, 0.09 / z}, "temperature 0.5");
}

// transformers' GenerationConfig defaults: greedy (do_sample false) whatever the temperature, top-k
// 50, top-p 1, penalty 1.
TEST(Sampler, DefaultsAreTransformersGreedy) {
    const sampling_params d;
    EXPECT_FALSE(d.do_sample);
    EXPECT_TRUE(d.greedy());
    EXPECT_EQ(d.temperature, 1.0f);
    EXPECT_EQ(d.top_k, 50);
    EXPECT_EQ(d.top_p, 1.0f);
    EXPECT_EQ(d.min_p, 0.0f);
    EXPECT_EQ(d.repetition_penalty, 1.0f);
    sampler            s(d);
    std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.5f};
    for (int i = 0; i < 20; ++i) {
        auto c = l;
        EXPECT_EQ(s.sample(c.data(), 4, {}), 3);
    }
}

TEST(Sampler, AtLeastOneTokenSurvives) {
    sampling_params p = plain();
    p.top_p           = 0.01f;
    p.min_p           = 1.0f;
    p.top_k           = 1;
    expect_freq(draw(p, {0.2, 0.3, 0.5}, 200), {0.0, 0.0, 1.0}, "all filters at their tightest");
}

TEST(Sampler, ASeedFixesTheDraws) {
    std::mt19937                          rng(42);
    std::uniform_real_distribution<float> u(-3.0f, 3.0f);
    std::vector<float>                    base(1000);
    for (auto& x : base) x = u(rng);
    sampling_params p;  // every filter on
    p.do_sample          = true;
    p.temperature        = 0.7f;
    p.top_k              = 40;
    p.top_p              = 0.9f;
    p.repetition_penalty = 1.1f;
    p.seed               = 17;
    auto run             = [&](uint64_t seed) {
        p.seed = seed;
        sampler              s(p);
        std::vector<int32_t> out, history;
        for (int i = 0; i < 50; ++i) {
            auto l = base;
            out.push_back(s.sample(l.data(), 1000, history));
            history.push_back(out.back());
        }
        return out;
    };
    EXPECT_EQ(run(17), run(17));
    EXPECT_NE(run(17), run(18));
}

}  // namespace
}  // namespace gptq
