// Ragged-batch forward pass for generation (llama.h: forward_batch): several independent
// sequences, each with its own KV cache and any number of new tokens, in one pass through
// layer_forward (llama_layer.cpp), whose linears run once over the rows of all sequences
// ([sum n_tokens, features], no padding). Only each sequence's last row reaches the lm_head.
#include <algorithm>

#include "core/error.h"
#include "model/llama.h"

namespace gptq {

status llama_model::forward_batch(const ops_context& ctx, const int32_t* ids, const int64_t* n_tokens, int64_t n_seq,
                                  kv_cache* const* caches, float* logits) {
    for (int64_t s = 0; s < n_seq; ++s) {
        const kv_cache* c = caches[s];
        if (n_tokens[s] < 1)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "sequence {} of the batch has {} tokens, expected at least 1", s, n_tokens[s]);
        if (!c || c->kv_dim != hp_.kv_dim() || static_cast<int64_t>(c->k.size()) != hp_.n_layer)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "sequence {} of the batch has no KV cache of this model", s);
        if (c->n_past + n_tokens[s] > c->n_ctx)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "sequence {}: {} tokens after {} cached ones exceed the cache's {} positions", s,
                              n_tokens[s], c->n_past, c->n_ctx);
        for (int64_t t = 0; t < s; ++t)
            if (caches[t] == c)
                return make_error(status_code::STATUS_INVALID_ARGUMENT, "sequences {} and {} share one KV cache", t, s);
    }
    if (n_seq == 0) return status::ok();
    bool reprefill = false;
    for (int64_t s = 0; s < n_seq; ++s) reprefill = reprefill || rope_needs_reprefill(*caches[s], n_tokens[s]);
    if (reprefill) {
        // A LongRoPE sequence crossing its switch runs all its tokens again from an empty cache
        // (llama_model::forward does the same); the batch is rebuilt with its whole history.
        std::vector<int32_t> all_ids;
        std::vector<int64_t> all_n(static_cast<size_t>(n_seq));
        const int32_t*       p = ids;
        for (int64_t s = 0; s < n_seq; ++s) {
            kv_cache* c = caches[s];
            if (rope_needs_reprefill(*c, n_tokens[s])) {
                if (static_cast<int64_t>(c->ids.size()) != c->n_past)
                    return make_error(status_code::STATUS_INVALID_ARGUMENT,
                                      "sequence {}: LongRoPE: the KV cache holds {} positions but {} token ids", s,
                                      c->n_past, c->ids.size());
                all_ids.insert(all_ids.end(), c->ids.begin(), c->ids.end());
                all_n[static_cast<size_t>(s)] = c->n_past + n_tokens[s];
                c->clear();
            } else {
                all_n[static_cast<size_t>(s)] = n_tokens[s];
            }
            all_ids.insert(all_ids.end(), p, p + n_tokens[s]);
            p += n_tokens[s];
        }
        return forward_batch(ctx, all_ids.data(), all_n.data(), n_seq, caches, logits);
    }
    std::vector<layer_seq> seqs(static_cast<size_t>(n_seq));
    for (int64_t s = 0; s < n_seq; ++s) seqs[static_cast<size_t>(s)] = {n_tokens[s], caches[s]->n_past, caches[s]};
    std::vector<float> hidden;  // [sum n_tokens, n_embd]
    GPTQ_TRY(layers_run(ctx, ids, seqs, &hidden));
    // Only each sequence's last row goes through the final norm and lm_head.
    std::vector<float> last(static_cast<size_t>(n_seq * hp_.n_embd));  // [n_seq, n_embd]
    int64_t            row = 0;
    for (int64_t s = 0; s < n_seq; ++s) {
        row += n_tokens[s];
        std::copy_n(hidden.data() + (row - 1) * hp_.n_embd, hp_.n_embd, last.data() + s * hp_.n_embd);
        caches[s]->n_past += n_tokens[s];
        caches[s]->ids.insert(caches[s]->ids.end(), ids + row - n_tokens[s], ids + row);
    }
    output_logits(ctx, last.data(), n_seq, logits);
    return status::ok();
}

}  // namespace gptq
