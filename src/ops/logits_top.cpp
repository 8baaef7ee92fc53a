// logits_top (logits_top.h): the plain reference.
#include "logits_top.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace gptq {

void logits_top::resize(int64_t n_rows, int64_t n_k) {
    rows = n_rows;
    k    = n_k;
    ids.resize(static_cast<size_t>(rows * k));
    logits.resize(static_cast<size_t>(rows * k));
    sum_exp.resize(static_cast<size_t>(rows));
    sum_exp_t.resize(static_cast<size_t>(rows));
}

void logits_top::set_row(int64_t r, const logits_top& from, int64_t r_from) {
    GPTQ_ASSERT(from.k == k && r >= 0 && r < rows && r_from >= 0 && r_from < from.rows);
    std::copy_n(from.ids.begin() + r_from * k, k, ids.begin() + r * k);
    std::copy_n(from.logits.begin() + r_from * k, k, logits.begin() + r * k);
    sum_exp[static_cast<size_t>(r)]   = from.sum_exp[static_cast<size_t>(r_from)];
    sum_exp_t[static_cast<size_t>(r)] = from.sum_exp_t[static_cast<size_t>(r_from)];
}

void logits_top_cpu(const float* logits, int64_t rows, int64_t n_vocab, int64_t k, const float* inv_temp,
                    logits_top* out) {
    GPTQ_ASSERT(k >= 1 && k <= k_logits_top_max && n_vocab >= 1);
    k = std::min(k, n_vocab);
    out->resize(rows, k);
    std::vector<int32_t> order(static_cast<size_t>(n_vocab));
    for (int64_t r = 0; r < rows; ++r) {
        const float* l = logits + r * n_vocab;
        std::iota(order.begin(), order.end(), 0);
        auto better = [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
        std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
        for (int64_t i = 0; i < k; ++i) {
            out->ids[static_cast<size_t>(r * k + i)]    = order[static_cast<size_t>(i)];
            out->logits[static_cast<size_t>(r * k + i)] = l[order[static_cast<size_t>(i)]];
        }
        const double m  = l[order[0]];
        const double it = inv_temp ? inv_temp[r] : 1.0;
        double       s1 = 0.0, st = 0.0;
        for (int64_t i = 0; i < n_vocab; ++i) {
            s1 += std::exp(static_cast<double>(l[i]) - m);
            st += std::exp((static_cast<double>(l[i]) - m) * it);
        }
        out->sum_exp[static_cast<size_t>(r)]   = s1;
        out->sum_exp_t[static_cast<size_t>(r)] = st;
    }
}

}  // namespace gptq
