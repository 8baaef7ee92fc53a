// Perplexity over fixed token windows (the GPTQ paper's protocol, docs/format.md 2.7):
// ids are cut into non-overlapping windows of seqlen tokens (a partial last window is dropped);
// in each window, tokens 1..seqlen-1 are predicted from the window's own prefix; the result is
// the mean negative log-likelihood over all predicted tokens (ppl = exp of it).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/status.h"
#include "model/llama.h"

namespace gptq {

struct perplexity_sums {
    double  nll_sum     = 0.0;  // sum of -log p(token) over predicted tokens, natural log
    int64_t n_predicted = 0;    // n_windows * (seqlen - 1)
    int64_t n_windows   = 0;
    double  ppl() const;  // exp(nll_sum / n_predicted)
};

// ids: [n_ids] token ids. max_windows 0 = all. on_window(i) is called after window i finishes.
result<perplexity_sums> perplexity_evaluate(llama_model& model, const ops_context& ctx, const std::vector<int32_t>& ids,
                                            int64_t seqlen, int64_t max_windows,
                                            const std::function<void(int64_t)>& on_window = {});

// The same protocol over any forward pass (the GPU model): forward(ids, n, logits) fills
// logits[n, n_vocab] (F32) for one window run from an empty cache. ctx serves the log-softmax.
using window_forward = std::function<status(const int32_t* ids, int64_t n_tokens, float* logits)>;
result<perplexity_sums> perplexity_evaluate(const window_forward& forward, int64_t n_vocab, const ops_context& ctx,
                                            const std::vector<int32_t>& ids, int64_t seqlen, int64_t max_windows,
                                            const std::function<void(int64_t)>& on_window = {});

}  // namespace gptq
