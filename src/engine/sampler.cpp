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

double sampler::draw() {
    if (!has_pending_) return uniform();
    has_pending_ = false;
    return pending_;
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
    const double u   = draw() * kept;
    double       acc = 0.0;
    for (size_t i = 0; i < n_keep; ++i) {
        acc += probs_[i];
        if (u < acc) return order_[i];
    }
    return order_[n_keep - 1];
}

}  // namespace gptq

namespace gptq {

bool sampler::penalise_candidates(const int32_t* ids, float* cand, int64_t k, const std::vector<int32_t>& history,
                                  const std::vector<int32_t>& banned, size_t n_prompt, bool* outside) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    slot_.resize(static_cast<size_t>(k));  // candidate indices by id, for the lookups
    for (int64_t i = 0; i < k; ++i) slot_[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    std::sort(slot_.begin(), slot_.end(), [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
    auto find = [&](int32_t id) -> int64_t {
        auto it = std::lower_bound(slot_.begin(), slot_.end(), id, [&](int32_t s, int32_t v) { return ids[s] < v; });
        return it != slot_.end() && ids[*it] == id ? *it : -1;
    };
    *outside = false;
    for (int32_t id : banned) {
        const int64_t i = find(id);
        if (i >= 0)
            cand[i] = neg_inf;
        else
            *outside = true;
    }
    if (p_.repetition_penalty != 1.0f && !history.empty()) {
        std::vector<int32_t> seen(history);
        std::sort(seen.begin(), seen.end());
        seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
        for (int32_t id : seen) {
            const int64_t i = find(id);
            if (i < 0) {
                *outside = true;
                if (p_.repetition_penalty < 1.0f) return false;  // raises a token we do not see
                continue;
            }
            float& l = cand[i];
            l        = l < 0 ? l * p_.repetition_penalty : l / p_.repetition_penalty;
        }
    }
    if ((p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f) && n_prompt < history.size()) {
        std::vector<int32_t> generated(history.begin() + static_cast<std::ptrdiff_t>(n_prompt), history.end());
        std::sort(generated.begin(), generated.end());
        for (size_t a = 0; a < generated.size();) {
            size_t b = a;
            while (b < generated.size() && generated[b] == generated[a]) ++b;
            const float   delta = p_.frequency_penalty * static_cast<float>(b - a) + p_.presence_penalty;
            const int64_t i     = find(generated[a]);
            if (i >= 0) {
                cand[i] -= delta;
            } else {
                *outside = true;
                if (delta < 0.0f) return false;
            }
            a = b;
        }
    }
    return true;
}

// S: the candidates whose (penalised, scaled) logit is above every other token's bound b / T; they
// are ranked exactly. Each filter of sample() then either ends inside S or needs the tokens past it.
bool sampler::sample_top(const int32_t* ids, const float* logits, int64_t k, int64_t n_vocab, double sum_exp_t,
                         const std::vector<int32_t>& history, const std::vector<int32_t>& banned, size_t n_prompt,
                         int32_t* out) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    if (k < 1) return false;
    if (k >= n_vocab) {  // the candidates are the whole row
        cand_.assign(static_cast<size_t>(n_vocab), neg_inf);
        for (int64_t i = 0; i < k; ++i) cand_[static_cast<size_t>(ids[i])] = logits[i];
        *out = sample(cand_.data(), n_vocab, history, banned, n_prompt);
        return true;
    }
    cand_.assign(logits, logits + k);
    bool outside = false;
    if (!penalise_candidates(ids, cand_.data(), k, history, banned, n_prompt, &outside)) return false;
    const float b = logits[k - 1];  // every other token's logit is at most b (and its id higher where equal)

    if (p_.greedy()) {
        int64_t best = -1;
        for (int64_t i = 0; i < k; ++i)
            if (cand_[i] > b && (best < 0 || cand_[i] > cand_[best] || (cand_[i] == cand_[best] && ids[i] < ids[best])))
                best = i;
        if (best < 0) return false;
        *out = ids[best];
        return true;
    }

    const float       bs       = b / p_.temperature;
    const bool        complete = bs == neg_inf;  // every other token is banned: S is all there is
    std::vector<char> in_s(static_cast<size_t>(k), 0);
    order_.clear();
    for (int64_t i = 0; i < k; ++i) {
        cand_[static_cast<size_t>(i)] /= p_.temperature;
        if (cand_[static_cast<size_t>(i)] > bs) order_.push_back(static_cast<int32_t>(i)), in_s[size_t(i)] = 1;
    }
    if (order_.empty()) return false;
    auto more_likely = [&](int32_t a, int32_t c) {
        return cand_[a] > cand_[c] || (cand_[a] == cand_[c] && ids[a] < ids[c]);
    };
    std::sort(order_.begin(), order_.end(), more_likely);
    const size_t n_s  = order_.size();
    size_t       n_in = n_s;        // tokens of S still kept
    bool         tail = !complete;  // whether tokens past S may still be kept
    if (p_.top_k > 0 && (!complete || static_cast<size_t>(p_.top_k) < n_s)) {
        if (static_cast<size_t>(p_.top_k) > n_s) return false;
        const float kth = cand_[order_[static_cast<size_t>(p_.top_k - 1)]];
        while (n_in > 0 && cand_[order_[n_in - 1]] < kth) --n_in;
        tail = false;
    }

    probs_.resize(n_in);
    const double m   = cand_[order_[0]];
    double       sum = 0.0;
    for (size_t i = 0; i < n_in; ++i) sum += (probs_[i] = static_cast<float>(std::exp(cand_[order_[i]] - m)));
    // With the tail: the row's whole mass in units of exp(m), from sum_exp_t (relative to the row's
    // max logits[0]) less the candidates' original terms, plus theirs as they are now outside S.
    double total = sum;
    if (tail && !outside) {
        const double it = 1.0 / static_cast<double>(p_.temperature), lmax = logits[0];
        double       orig = 0.0, rest = 0.0;
        for (int64_t i = 0; i < k; ++i) {
            orig += std::exp((static_cast<double>(logits[i]) - lmax) * it);
            if (!in_s[size_t(i)]) rest += std::exp(static_cast<double>(cand_[size_t(i)]) - m);
        }
        total += std::max(0.0, sum_exp_t - orig) * std::exp(lmax * it - m) + rest;
    }
    size_t n_keep = n_in;
    if (p_.top_p < 1.0f) {
        if (tail && outside) return false;
        const double norm  = tail ? total : sum;
        double       above = 0.0;
        bool         cut   = false;
        for (size_t i = 0; i < n_in; ++i) {
            if (i > 0 && above >= p_.top_p) {
                n_keep = i;
                cut    = true;
                break;
            }
            above += probs_[i] / norm;
        }
        if (!cut && tail && !(above >= p_.top_p)) return false;  // the cut falls past S
        tail = false;
    }
    if (p_.min_p > 0.0f) {
        const double threshold = p_.min_p * probs_[0];
        size_t       i         = 1;
        while (i < n_keep && probs_[i] >= threshold) ++i;
        if (i < n_keep) {
            n_keep = i;
            tail   = false;
        } else if (tail) {  // the most likely token past S has at most b / T
            if (!(static_cast<float>(std::exp(static_cast<double>(bs) - m)) < threshold)) return false;
            tail = false;
        }
    }
    if (tail && outside) return false;
    double kept = 0.0;
    for (size_t i = 0; i < n_keep; ++i) kept += probs_[i];
    if (tail) kept = total;
    const double u01 = draw(), u = u01 * kept;
    double       acc = 0.0;
    for (size_t i = 0; i < n_keep; ++i) {
        acc += probs_[i];
        if (u < acc) {
            *out = ids[order_[i]];
            return true;
        }
    }
    if (!tail) {
        *out = ids[order_[n_keep - 1]];
        return true;
    }
    has_pending_ = true;  // the draw falls past S: sample() on the whole row takes it
    pending_     = u01;
    return false;
}

}  // namespace gptq
