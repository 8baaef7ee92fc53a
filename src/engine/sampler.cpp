// Sampler (include/gptq/sampler.h). The filters follow transformers' logits processors:
// RepetitionPenalty (each distinct seen id once), then OpenAI's presence/frequency penalties over
// the generated ids, Temperature, TopK (keeps every token at least as
// likely as the k-th), TopP (drops a token when the tokens strictly more likely already hold top_p
// of the mass), MinP (drops p < min_p * p_max), each keeping at least one token.
#include "gptq/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace gptq {

double sampler::uniform() {
    return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

int32_t sampler::sample(float* logits, int64_t n_vocab, const std::vector<int32_t>& history,
                        const std::vector<int32_t>& banned, size_t n_prompt) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    for (int32_t id : banned)
        if (id >= 0 && id < n_vocab) logits[id] = neg_inf;
    if (p_.repetition_penalty != 1.0f && !history.empty()) {
        std::vector<char> seen(static_cast<size_t>(n_vocab), 0);
        for (int32_t id : history) {
            if (id < 0 || id >= n_vocab || seen[static_cast<size_t>(id)]) continue;
            seen[static_cast<size_t>(id)] = 1;
            float& l                      = logits[id];
            l                             = l < 0 ? l * p_.repetition_penalty : l / p_.repetition_penalty;
        }
    }
    if ((p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f) && n_prompt < history.size()) {
        std::vector<int32_t> generated(history.begin() + static_cast<std::ptrdiff_t>(n_prompt), history.end());
        std::sort(generated.begin(), generated.end());
        for (size_t i = 0; i < generated.size();) {
            size_t j = i;
            while (j < generated.size() && generated[j] == generated[i]) ++j;
            const int32_t id = generated[i];
            if (id >= 0 && id < n_vocab)
                logits[id] -= p_.frequency_penalty * static_cast<float>(j - i) + p_.presence_penalty;
            i = j;
        }
    }
    if (p_.greedy()) {  // the first maximum, as torch.argmax
        int64_t best = 0;
        for (int64_t i = 1; i < n_vocab; ++i)
            if (logits[i] > logits[best]) best = i;
        return static_cast<int32_t>(best);
    }

    order_.clear();
    for (int64_t i = 0; i < n_vocab; ++i) {
        logits[i] /= p_.temperature;
        if (logits[i] > neg_inf) order_.push_back(static_cast<int32_t>(i));
    }
    if (order_.empty()) return 0;  // every token banned: nothing sensible to do
    auto more_likely = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < order_.size()) {
        std::nth_element(order_.begin(), order_.begin() + (p_.top_k - 1), order_.end(), more_likely);
        const float kth = logits[order_[static_cast<size_t>(p_.top_k - 1)]];
        order_.erase(std::remove_if(order_.begin(), order_.end(), [&](int32_t id) { return logits[id] < kth; }),
                     order_.end());
    }
    std::sort(order_.begin(), order_.end(), more_likely);

    // Softmax over the candidates (most likely first), in double.
    probs_.resize(order_.size());
    const double m   = logits[order_[0]];
    double       sum = 0.0;
    for (size_t i = 0; i < order_.size(); ++i) sum += (probs_[i] = static_cast<float>(std::exp(logits[order_[i]] - m)));
    size_t n_keep = order_.size();
    if (p_.top_p < 1.0f) {
        double above = 0.0;  // mass of the strictly more likely tokens
        for (size_t i = 0; i < n_keep; ++i) {
            if (i > 0 && above >= p_.top_p) {
                n_keep = i;
                break;
            }
            above += probs_[i] / sum;
        }
    }
    if (p_.min_p > 0.0f) {
        const double threshold = p_.min_p * probs_[0];  // ratios do not depend on the normalisation
        size_t       i         = 1;
        while (i < n_keep && probs_[i] >= threshold) ++i;
        n_keep = i;
    }
    double kept = 0.0;
    for (size_t i = 0; i < n_keep; ++i) kept += probs_[i];
    const double u   = uniform() * kept;
    double       acc = 0.0;
    for (size_t i = 0; i < n_keep; ++i) {
        acc += probs_[i];
        if (u < acc) return order_[i];
    }
    return order_[n_keep - 1];
}

}  // namespace gptq
