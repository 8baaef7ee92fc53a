// Token sampler for generation: repetition penalty, presence/frequency penalties, then temperature, top-k, top-p, min-p
// (the order of transformers' logits processors), then a draw from a seeded RNG; greedy (argmax, lowest id on ties,
// after the penalty) unless do_sample, or when temperature is 0. Implemented in src/engine/sampler.cpp.
//
// Reproducibility: the draw uses std::mt19937_64 (whose output the C++ standard fixes) and our own
// bits-to-double conversion, so a seed gives the same tokens on every platform for the same logits.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace gptq {

// The defaults are transformers' GenerationConfig defaults (greedy, penalty off); a model's own
// come from its generation_config.json (gptq/generate.h generator::default_params).
struct sampling_params {
    bool    do_sample          = false;  // false: greedy (temperature, top-k/p, min-p unused)
    float   temperature        = 1.0f;   // with do_sample; 0: greedy
    int32_t top_k              = 50;     // keep the k most likely tokens; 0 or >= n_vocab: off
    float   top_p              = 1.0f;   // keep the smallest most-likely set with mass >= top_p; 1: off
    float   min_p              = 0.0f;   // drop tokens with p < min_p * p_max; 0: off
    float   repetition_penalty = 1.0f;   // logits of seen tokens: > 0 divided, < 0 multiplied; 1: off
    // OpenAI's: each generated id's logit -= frequency_penalty * count + presence_penalty; 0: off.
    float    presence_penalty  = 0.0f;
    float    frequency_penalty = 0.0f;
    uint64_t seed              = 0;

    bool greedy() const { return !do_sample || temperature <= 0.0f; }
};

class sampler {
public:
    explicit sampler(const sampling_params& p) : p_(p), rng_(p.seed) {}

    // Pick the next token from logits[n_vocab] (modified in place: penalty, temperature, filters).
    // history: the ids the repetition penalty looks at (prompt and generated so far), as
    // transformers does. banned: ids that must not be picked (logit set to -inf first).
    // n_prompt: history[n_prompt, end) are the generated ids, which the presence and frequency
    // penalties count (OpenAI counts the completion's tokens only).
    int32_t sample(float* logits, int64_t n_vocab, const std::vector<int32_t>& history,
                   const std::vector<int32_t>& banned = {}, size_t n_prompt = 0);

    // The same choice from a row's candidates (ops/logits_top.h: its k most likely ids and logits,
    // larger first with ties by lower id, and sum_exp_t, the row's sum of exp((l - max) / T)):
    // returns true with *out = the token sample() would pick from the whole row, with the same
    // draws; false when the candidates do not decide it (a top-p or plain draw reaching past them, a
    // penalty raising a token outside them, ...): then call sample() on the whole row, which uses
    // any draw this call made. Exact but for the rounding of the row's total mass (sum_exp_t
    // summed in id order, sample() in likelihood order) where a draw needs it (top_k 0).
    bool sample_top(const int32_t* ids, const float* logits, int64_t k, int64_t n_vocab, double sum_exp_t,
                    const std::vector<int32_t>& history, const std::vector<int32_t>& banned, size_t n_prompt,
                    int32_t* out);

    const sampling_params& params() const { return p_; }

private:
    double uniform();  // [0, 1) with 53 random bits
    double draw();     // the draw sample_top left pending, else uniform()
    // Each id of `mods` with its penalised logit (as sample() computes it) where it is a candidate;
    // returns false when a penalty raises a token that is not a candidate; *outside: some penalty
    // or ban touches one.
    bool penalise_candidates(const int32_t* ids, float* cand, int64_t k, const std::vector<int32_t>& history,
                             const std::vector<int32_t>& banned, size_t n_prompt, bool* outside);

    bool                 has_pending_ = false;
    double               pending_     = 0.0;
    std::vector<float>   cand_;  // sample_top's scratch
    std::vector<int32_t> slot_;

    sampling_params      p_;
    std::mt19937_64      rng_;
    std::vector<float>   probs_;  // scratch
    std::vector<int32_t> order_;
};

}  // namespace gptq
