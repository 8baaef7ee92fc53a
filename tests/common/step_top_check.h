// A check both backends' model_session tests run (engine/model_session.h step_top): the same
// ragged steps (prompts in chunks, decode tokens, a slot reused) on two fresh sessions, one with
// step() and one with step_top(): every row's candidates equal logits_top_cpu of step()'s row,
// step_row_logits equals that row, and a step asking for all_logits is refused.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "engine/model_session.h"
#include "ops/logits_top.h"

namespace gptq::test {

inline void check_step_top(const std::function<std::unique_ptr<model_session>()>& open, int64_t k) {
    auto a = open(), b = open();
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(a->reserve(3, 64).is_ok());
    ASSERT_TRUE(b->reserve(3, 64).is_ok());
    const int64_t V   = a->n_vocab();
    auto          ids = [&](int64_t n, int64_t salt) {
        std::vector<int32_t> v(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<int32_t>((i * 31 + salt * 7 + 3) % V);
        return v;
    };
    // Step plans: {slot, n_tokens} per entry; a reset of slot 1 before the fourth step.
    const std::vector<std::vector<std::pair<int64_t, int64_t>>> plan = {
        {{0, 9}, {1, 1}}, {{0, 1}, {1, 5}, {2, 12}}, {{0, 1}, {1, 1}, {2, 1}}, {{1, 7}, {2, 1}}, {{0, 1}, {1, 1}}};
    std::vector<float> inv_temp = {1.0f, 0.5f, 2.0f};
    for (size_t s = 0; s < plan.size(); ++s) {
        if (s == 3) a->seq_reset(1), b->seq_reset(1);
        std::vector<std::vector<int32_t>> tok;
        std::vector<seq_step>             steps;
        for (auto [slot, n] : plan[s]) tok.push_back(ids(n, int64_t(s * 10) + slot));
        for (size_t i = 0; i < plan[s].size(); ++i)
            steps.push_back({.seq = plan[s][i].first, .ids = tok[i].data(), .n_tokens = plan[s][i].second});
        std::vector<float> logits(steps.size() * size_t(V));
        ASSERT_TRUE(a->step(steps, logits.data()).is_ok());
        logits_top   got, want;
        const status st = b->step_top(steps, k, inv_temp.data(), &got);
        ASSERT_TRUE(st.is_ok()) << st.message();
        logits_top_cpu(logits.data(), int64_t(steps.size()), V, k, inv_temp.data(), &want);
        ASSERT_EQ(got.ids, want.ids) << "step " << s;
        ASSERT_EQ(got.logits, want.logits) << "step " << s;
        for (size_t r = 0; r < steps.size(); ++r) {
            // The GPU sums in another order: within n_vocab * 2^-52 (recursive summation).
            const double rel = double(V) * 0x1p-52;
            EXPECT_NEAR(got.sum_exp[r], want.sum_exp[r], rel * want.sum_exp[r]);
            EXPECT_NEAR(got.sum_exp_t[r], want.sum_exp_t[r], rel * want.sum_exp_t[r]);
            std::vector<float> row(static_cast<size_t>(V));
            ASSERT_TRUE(b->step_row_logits(int64_t(r), row.data()).is_ok());
            EXPECT_EQ(0, std::memcmp(row.data(), logits.data() + r * size_t(V), size_t(V) * 4)) << "row " << r;
        }
        EXPECT_FALSE(b->step_row_logits(int64_t(steps.size()), nullptr).is_ok());
    }
    std::vector<int32_t> one   = {1, 2};
    seq_step             all[] = {{.seq = 0, .ids = one.data(), .n_tokens = 2, .all_logits = true}};
    logits_top           t;
    const status         st = b->step_top(all, k, nullptr, &t);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("every row"), std::string::npos) << st.message();
}

}  // namespace gptq::test
