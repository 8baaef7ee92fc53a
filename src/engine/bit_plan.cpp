// Bit allocation for --target-bpw (bit_plan.h): a multiple-choice knapsack solved greedily on each
// module's convex hull, then filled up with the best single moves that still fit.
#include "bit_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <queue>

#include "core/error.h"
#include "io/gptq_checkpoint.h"

namespace gptq {

uint64_t gptq_module_bytes(int64_t n_out, int64_t n_in, int bits, int group_size) {
    const int64_t n_groups = group_size > 0 ? (n_in + group_size - 1) / group_size : 1;
    uint64_t      total    = 0;
    for (const auto& d : gptq_linear_decls("m", n_out, n_in, n_groups, bits, /*has_bias=*/false)) {
        uint64_t n = d.type == dtype::DTYPE_F16 ? 2 : 4;
        for (int64_t x : d.shape) n *= static_cast<uint64_t>(x);
        total += n;
    }
    return total;
}

uint64_t bit_plan_budget_bytes(const std::vector<bit_plan_module>& modules, double target_bpw) {
    int64_t n = 0;
    for (const auto& m : modules) n += m.n_out * m.n_in;
    return static_cast<uint64_t>(std::floor(target_bpw * static_cast<double>(n) / 8.0));
}

namespace {

// Indices of the choices on the lower convex hull of (bytes, error), by increasing bytes: each
// step saves error at a falling rate per byte (dominated and concave points dropped).
std::vector<size_t> lower_hull(const std::vector<bit_choice>& c) {
    std::vector<size_t> order(c.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return c[a].bytes != c[b].bytes ? c[a].bytes < c[b].bytes : c[a].error < c[b].error;
    });
    std::vector<size_t> hull;
    for (size_t i : order) {
        if (!hull.empty() && c[i].error >= c[hull.back()].error) continue;  // more bytes, no less error
        if (!hull.empty() && c[i].bytes == c[hull.back()].bytes) continue;
        while (hull.size() >= 2) {
            const bit_choice& a = c[hull[hull.size() - 2]];
            const bit_choice& b = c[hull.back()];
            // b is above the segment a -> c[i]: drop it.
            const double lhs = (b.error - a.error) * double(c[i].bytes - a.bytes);
            const double rhs = (c[i].error - a.error) * double(b.bytes - a.bytes);
            if (lhs >= rhs)
                hull.pop_back();
            else
                break;
        }
        hull.push_back(i);
    }
    return hull;
}

// One step of the local search of bit_plan_solve: the move, or pair of moves on two modules, that
// lowers the summed error the most and fits the budget; false when there is none.
bool improve_once(const std::vector<bit_plan_module>& modules, uint64_t budget, bit_plan* plan) {
    struct move {
        size_t  m, c;
        double  d_error;  // change of the summed error
        int64_t d_bytes;  // change of the bytes
    };
    const int64_t     slack = static_cast<int64_t>(budget) - static_cast<int64_t>(plan->bytes);
    std::vector<move> up, down;  // down: moves that free bytes, by bytes freed (most first)
    for (size_t m = 0; m < modules.size(); ++m) {
        const bit_choice& cur = modules[m].choices[plan->pick[m]];
        for (size_t c = 0; c < modules[m].choices.size(); ++c) {
            const bit_choice& o = modules[m].choices[c];
            const move mv{m, c, o.error - cur.error, static_cast<int64_t>(o.bytes) - static_cast<int64_t>(cur.bytes)};
            if (mv.d_error < 0) up.push_back(mv);
            if (mv.d_bytes < 0) down.push_back(mv);
        }
    }
    std::sort(down.begin(), down.end(), [](const move& a, const move& b) { return a.d_bytes < b.d_bytes; });
    // best[k], second[k]: the two cheapest (in error) of down[0..k] on different modules.
    std::vector<int64_t> best(down.size(), -1), second(down.size(), -1);
    for (size_t k = 0; k < down.size(); ++k) {
        int64_t     b = k ? best[k - 1] : -1, s2 = k ? second[k - 1] : -1;
        const move& mv = down[k];
        if (b < 0 || mv.d_error < down[size_t(b)].d_error) {
            if (b >= 0 && down[size_t(b)].m != mv.m)
                s2 = b;
            else if (b >= 0 && s2 >= 0 && down[size_t(s2)].m == mv.m)
                s2 = -1;
            b = int64_t(k);
        } else if (mv.m != down[size_t(b)].m && (s2 < 0 || mv.d_error < down[size_t(s2)].d_error)) {
            s2 = int64_t(k);
        }
        best[k]   = b;
        second[k] = s2;
    }
    double best_gain = 1e-12 * (plan->error > 0 ? plan->error : 1.0);
    move   a_best{}, b_best{};
    bool   found = false, pair = false;
    for (const move& a : up) {
        if (a.d_bytes <= slack) {
            if (-a.d_error > best_gain) {
                best_gain = -a.d_error;
                a_best    = a;
                found     = true;
                pair      = false;
            }
            continue;
        }
        const int64_t need = a.d_bytes - slack;  // bytes another module must free
        // down is sorted by d_bytes ascending (most freed first): those with -d_bytes >= need.
        const auto end =
            std::partition_point(down.begin(), down.end(), [&](const move& d) { return -d.d_bytes >= need; });
        if (end == down.begin()) continue;
        const size_t k = size_t(end - down.begin()) - 1;
        int64_t      j = best[k];
        if (j >= 0 && down[size_t(j)].m == a.m) j = second[k];
        if (j < 0) continue;
        const double gain = -(a.d_error + down[size_t(j)].d_error);
        if (gain > best_gain) {
            best_gain = gain;
            a_best    = a;
            b_best    = down[size_t(j)];
            found     = true;
            pair      = true;
        }
    }
    if (!found) return false;
    auto apply = [&](const move& mv) {
        plan->bytes      = uint64_t(int64_t(plan->bytes) + mv.d_bytes);
        plan->pick[mv.m] = mv.c;
    };
    apply(a_best);
    if (pair) apply(b_best);
    plan->error = 0;
    for (size_t m = 0; m < modules.size(); ++m) plan->error += modules[m].choices[plan->pick[m]].error;
    return true;
}

}  // namespace

result<bit_plan> bit_plan_solve(const std::vector<bit_plan_module>& modules, uint64_t budget_bytes) {
    bit_plan plan;
    plan.budget_bytes = budget_bytes;
    plan.pick.resize(modules.size());
    std::vector<std::vector<size_t>> hulls(modules.size());
    std::vector<size_t>              at(modules.size(), 0);  // position on the hull
    for (size_t m = 0; m < modules.size(); ++m) {
        if (modules[m].choices.empty())
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "--target-bpw: {} has no possible setting",
                              modules[m].module);
        hulls[m]     = lower_hull(modules[m].choices);
        plan.pick[m] = hulls[m][0];
        plan.bytes += modules[m].choices[plan.pick[m]].bytes;
        plan.n_weights += modules[m].n_out * modules[m].n_in;
    }
    if (plan.bytes > budget_bytes)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "--target-bpw: {:.4f} bits per weight ({} bytes) is below the smallest possible, {:.4f} ({} "
                          "bytes: every module at its fewest bits)",
                          plan.n_weights ? 8.0 * double(budget_bytes) / double(plan.n_weights) : 0.0, budget_bytes,
                          plan.bpw(), plan.bytes);
    // Hull upgrades, best error saved per byte first; one that does not fit is dropped (a later,
    // smaller one of another module may still fit).
    struct step {
        double rate;
        size_t m;
        bool   operator<(const step& o) const { return rate < o.rate || (rate == o.rate && m > o.m); }
    };
    std::priority_queue<step> q;
    auto                      push_next = [&](size_t m) {
        if (at[m] + 1 >= hulls[m].size()) return;
        const bit_choice& a = modules[m].choices[hulls[m][at[m]]];
        const bit_choice& b = modules[m].choices[hulls[m][at[m] + 1]];
        q.push({(a.error - b.error) / double(b.bytes - a.bytes), m});
    };
    for (size_t m = 0; m < modules.size(); ++m) push_next(m);
    while (!q.empty()) {
        const size_t m = q.top().m;
        q.pop();
        const bit_choice& a = modules[m].choices[hulls[m][at[m]]];
        const bit_choice& b = modules[m].choices[hulls[m][at[m] + 1]];
        if (plan.bytes - a.bytes + b.bytes > budget_bytes) continue;
        plan.bytes = plan.bytes - a.bytes + b.bytes;
        ++at[m];
        plan.pick[m] = hulls[m][at[m]];
        push_next(m);
    }
    // Local search: the best single move (any module to any choice of lower error that fits the
    // bytes left) or pair of moves (one module up, another down to free the bytes it needs) until
    // none lowers the error.
    for (size_t m = 0; m < modules.size(); ++m) plan.error += modules[m].choices[plan.pick[m]].error;
    while (improve_once(modules, budget_bytes, &plan)) {
    }
    plan.error = 0;
    for (size_t m = 0; m < modules.size(); ++m) plan.error += modules[m].choices[plan.pick[m]].error;
    return plan;
}

}  // namespace gptq
