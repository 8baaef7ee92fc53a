// --target-bpw's allocation (engine/bit_plan.h): the bytes of a module as the checkpoint writes
// them, the budget respected exactly, no single move left that fits, the best plan on small
// instances where every combination can be tried, and the refusal of a budget below the minimum.
#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "engine/bit_plan.h"
#include "io/gptq_checkpoint.h"

using namespace gptq;

namespace {

// Modules like a small llama's (q/k/v/o, gate/up/down shapes), choices bits {2,3,4,8} x groups
// {32, 128}, errors falling about 4x per bit with a random per-module sensitivity.
std::vector<bit_plan_module> random_modules(uint64_t seed, int n_modules) {
    std::mt19937_64                        rng(seed);
    std::uniform_real_distribution<double> sens(0.1, 10.0), jitter(0.8, 1.25);
    const int64_t                          shapes[][2] = {{256, 256}, {128, 256}, {768, 256}, {256, 768}};
    std::vector<bit_plan_module>           mods;
    for (int m = 0; m < n_modules; ++m) {
        bit_plan_module pm;
        pm.module      = "model.layers." + std::to_string(m) + ".x";
        pm.n_out       = shapes[m % 4][0];
        pm.n_in        = shapes[m % 4][1];
        const double s = sens(rng);
        for (int b : {2, 3, 4, 8})
            for (int g : {32, 128})
                pm.choices.push_back({b, g, gptq_module_bytes(pm.n_out, pm.n_in, b, g),
                                      s * std::pow(4.0, -b) * (g == 32 ? 0.7 : 1.0) * jitter(rng)});
        mods.push_back(pm);
    }
    return mods;
}

uint64_t plan_bytes(const std::vector<bit_plan_module>& mods, const std::vector<size_t>& pick) {
    uint64_t b = 0;
    for (size_t m = 0; m < mods.size(); ++m) b += mods[m].choices[pick[m]].bytes;
    return b;
}

}  // namespace

TEST(bit_plan, module_bytes_are_the_checkpoint_tensors) {
    // q_proj 256 x 256, 4-bit g128: qweight 32 x 256 I32, qzeros 2 x 32 I32, scales 2 x 256 F16,
    // g_idx 256 I32.
    EXPECT_EQ(gptq_module_bytes(256, 256, 4, 128), 32u * 256 * 4 + 2 * 32 * 4 + 2 * 256 * 2 + 256 * 4);
    // 3-bit, group -1 (one group): qweight 24 x 768, qzeros 1 x 72 words.
    EXPECT_EQ(gptq_module_bytes(768, 256, 3, -1), 24u * 768 * 4 + 72 * 4 + 768 * 2 + 256 * 4);
    for (int b : {2, 3, 4, 8}) {
        uint64_t sum = 0;
        for (const auto& d : gptq_linear_decls("m", 512, 1024, 1024 / 64, b, false))
            sum += uint64_t(d.shape[0]) * uint64_t(d.shape.size() > 1 ? d.shape[1] : 1) *
                   (d.type == dtype::DTYPE_F16 ? 2 : 4);
        EXPECT_EQ(gptq_module_bytes(512, 1024, b, 64), sum) << b;
    }
}

TEST(bit_plan, budget_is_respected_and_no_single_move_fits) {
    const auto mods = random_modules(7, 28);
    for (double bpw : {2.3, 2.5, 3.0, 3.5, 4.0, 4.25, 5.0, 6.0, 8.5, 9.0}) {
        const uint64_t budget = bit_plan_budget_bytes(mods, bpw);
        auto           plan   = bit_plan_solve(mods, budget);
        ASSERT_TRUE(plan.is_ok()) << bpw << ": " << plan.error().message();
        EXPECT_EQ(plan->bytes, plan_bytes(mods, plan->pick));
        EXPECT_LE(plan->bytes, budget) << bpw;
        EXPECT_LE(plan->bpw(), bpw);
        // Tight: no module can move to a choice of lower error within the bytes left.
        for (size_t m = 0; m < mods.size(); ++m) {
            const auto& cur = mods[m].choices[plan->pick[m]];
            for (const auto& o : mods[m].choices)
                if (o.error < cur.error) {
                    EXPECT_GT(plan->bytes - cur.bytes + o.bytes, budget)
                        << bpw << " " << mods[m].module << " could move to " << o.bits << "b g" << o.group_size;
                }
        }
    }
    // All at 8 bits g32 fits a budget of that size exactly.
    uint64_t top = 0;
    for (const auto& m : mods) top += gptq_module_bytes(m.n_out, m.n_in, 8, 32);
    auto all8 = bit_plan_solve(mods, top);
    ASSERT_TRUE(all8.is_ok());
    for (size_t m = 0; m < mods.size(); ++m) EXPECT_EQ(mods[m].choices[all8->pick[m]].bits, 8);
}

TEST(bit_plan, close_to_the_best_plan_on_small_instances) {
    // 4 modules x 8 choices = 4096 plans: the greedy plan's error against the best that fits.
    int    equal = 0, n = 0;
    double worst = 1.0;
    for (uint64_t seed = 1; seed <= 20; ++seed) {
        const auto mods = random_modules(seed, 4);
        for (double bpw : {2.6, 3.2, 3.8, 4.4}) {
            const uint64_t budget = bit_plan_budget_bytes(mods, bpw);
            auto           plan   = bit_plan_solve(mods, budget);
            ASSERT_TRUE(plan.is_ok());
            double              best = INFINITY;
            std::vector<size_t> pick(4);
            for (pick[0] = 0; pick[0] < 8; ++pick[0])
                for (pick[1] = 0; pick[1] < 8; ++pick[1])
                    for (pick[2] = 0; pick[2] < 8; ++pick[2])
                        for (pick[3] = 0; pick[3] < 8; ++pick[3]) {
                            if (plan_bytes(mods, pick) > budget) continue;
                            double e = 0;
                            for (size_t m = 0; m < 4; ++m) e += mods[m].choices[pick[m]].error;
                            best = std::min(best, e);
                        }
            worst = std::max(worst, plan->error / best);
            EXPECT_LE(plan->error, 1.5 * best) << "seed " << seed << " bpw " << bpw;
            equal += plan->error <= best * (1 + 1e-12);
            ++n;
        }
    }
    EXPECT_GE(equal, 3 * n / 4) << "the greedy plan is the best one in " << equal << " of " << n << " cases";
    RecordProperty("best_of", std::to_string(equal) + "/" + std::to_string(n));
    RecordProperty("worst_ratio", std::to_string(worst));
    std::printf("greedy plan = best in %d of %d cases, worst error ratio %.4f\n", equal, n, worst);
}

TEST(bit_plan, a_budget_below_the_minimum_is_refused) {
    const auto mods = random_modules(3, 8);
    auto       plan = bit_plan_solve(mods, bit_plan_budget_bytes(mods, 2.0));
    ASSERT_FALSE(plan.is_ok());
    EXPECT_NE(plan.error().message().find("below the smallest possible"), std::string::npos) << plan.error().message();
}
