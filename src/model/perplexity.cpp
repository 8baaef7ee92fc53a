#include "model/perplexity.h"

#include <cmath>

#include "core/error.h"

namespace gptq {

double perplexity_sums::ppl() const {
    return n_predicted > 0 ? std::exp(nll_sum / static_cast<double>(n_predicted)) : NAN;
}

result<perplexity_sums> perplexity_evaluate(llama_model& model, const ops_context& ctx, const std::vector<int32_t>& ids,
                                            int64_t seqlen, int64_t max_windows,
                                            const std::function<void(int64_t)>& on_window) {
    const window_forward fwd = [&](const int32_t* win, int64_t n, float* logits) {
        return model.forward(ctx, win, n, nullptr, logits);
    };
    return perplexity_evaluate(fwd, model.hparams().n_vocab, ctx, ids, seqlen, max_windows, on_window);
}

result<perplexity_sums> perplexity_evaluate(const window_forward& forward, int64_t n_vocab, const ops_context& ctx,
                                            const std::vector<int32_t>& ids, int64_t seqlen, int64_t max_windows,
                                            const std::function<void(int64_t)>& on_window) {
    if (seqlen < 2)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "seqlen is {}, expected at least 2", seqlen);
    if (max_windows < 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "max_windows is {}, expected >= 0", max_windows);
    int64_t n_windows = static_cast<int64_t>(ids.size()) / seqlen;
    if (n_windows == 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "the text has {} tokens, fewer than one window of seqlen {}", ids.size(), seqlen);
    if (max_windows > 0 && max_windows < n_windows) n_windows = max_windows;

    const int64_t      V = n_vocab;
    std::vector<float> logits(static_cast<size_t>(seqlen * V));  // [seqlen, n_vocab], log-probs after op_log_softmax
    perplexity_sums    s;
    for (int64_t w = 0; w < n_windows; ++w) {
        const int32_t* win = ids.data() + w * seqlen;
        GPTQ_TRY(forward(win, seqlen, logits.data()).with_context("window " + std::to_string(w)));
        // Row t predicts token t + 1; the last row predicts past the window and is not scored.
        op_log_softmax(ctx, logits.data(), logits.data(), seqlen - 1, V);
        for (int64_t t = 0; t + 1 < seqlen; ++t) s.nll_sum -= logits[static_cast<size_t>(t * V + win[t + 1])];
        s.n_predicted += seqlen - 1;
        s.n_windows = w + 1;
        if (on_window) on_window(w);
    }
    return s;
}

}  // namespace gptq
