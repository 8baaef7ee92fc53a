// The most likely tokens of logits rows, for sampling without the rows (docs/serve.md "Sampling
// on candidates"): each row's k largest logits with their ids, and the row's softmax normalisers,
// so that a sampler can decide from k values instead of n_vocab (sampler::sample_top). The GPU
// computes them where the logits are (kernels/cuda/logits_top.cuh, op_cuda_logits_top) and the
// host downloads a few hundred bytes per row; logits_top_cpu is the plain reference and the CPU
// backend's path.
//
//     logits_top t;
//     logits_top_cpu(logits, rows, n_vocab, /*k=*/64, inv_temp, &t);
//     t.id(r, 0)                  // row r's most likely token (ties: the lower id)
//     t.max(r) + log(t.sum_exp[r]) // row r's log-sum-exp
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace gptq {

// k of at most this many candidates per row (the GPU kernel's shared-memory bound).
constexpr int64_t k_logits_top_max = 256;

struct logits_top {
    int64_t              rows = 0, k = 0;  // k = min(asked, n_vocab)
    std::vector<int32_t> ids;              // [rows, k]: larger logit first, equal logits: lower id first
    std::vector<float>   logits;           // [rows, k]: their logits, as the row holds them
    // [rows]: sum over the whole row of exp(l - max) and of exp((l - max) * inv_temp[row]) (the
    // row's temperature; 1 where inv_temp is nullptr), max = logits[r * k].
    std::vector<double> sum_exp, sum_exp_t;

    int32_t id(int64_t r, int64_t i) const { return ids[static_cast<size_t>(r * k + i)]; }
    float   max(int64_t r) const { return logits[static_cast<size_t>(r * k)]; }
    void    resize(int64_t rows, int64_t k);
    // Row r of this = row r_from of `from` (the same k).
    void set_row(int64_t r, const logits_top& from, int64_t r_from);
};

// Candidates of logits[rows, n_vocab] (F32, host); 1 <= k <= k_logits_top_max; inv_temp[rows] or
// nullptr. Sums in double in id order.
void logits_top_cpu(const float* logits, int64_t rows, int64_t n_vocab, int64_t k, const float* inv_temp,
                    logits_top* out);

}  // namespace gptq
