// Ragged-batch forward pass for generation (llama.h: forward_batch): several independent
// sequences, each with its own KV cache and any number of new tokens, in one pass through
// layer_forward (llama_layer.cpp), whose linears run once over the rows of all sequences
// ([sum n_tokens, features], no padding). Only each sequence's last row (or all of its rows, when
// asked) reaches the lm_head.
#include <algorithm>

#include "core/error.h"
#include "model/llama.h"

namespace gptq {

status llama_model::forward_batch(const ops_context& ctx, const int32_t* ids, const int64_t* n_tokens, int64_t n_seq,
                                  kv_cache* const* caches, float* logits, const bool* all_logits,
                                  const int32_t* loras) {
    for (int64_t s = 0; s < n_seq; ++s) {
        const kv_cache* c = caches[s];
        if (loras && (loras[s] < -1 || loras[s] >= static_cast<int32_t>(loras_.size())))
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "sequence {} of the batch asks for LoRA adapter {}, {} are loaded", s, loras[s],
                              loras_.size());
        if (n_tokens[s] < 1)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "sequence {} of the batch has {} tokens, expected at least 1", s, n_tokens[s]);
        if (!c || c->kv_dim != hp_.kv_dim() || c->n_layer() != hp_.n_layer)
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
    for (int64_t s = 0; s < n_seq; ++s) reprefill = reprefill || rope_needs_reprefill(caches[s]->n_past, n_tokens[s]);
    if (reprefill) {
        // A LongRoPE sequence crossing its switch runs all its tokens again from an empty cache
        // (llama_model::forward does the same); the batch is rebuilt with its whole history.
        std::vector<int32_t> all_ids;
        std::vector<int64_t> all_n(static_cast<size_t>(n_seq));
        const int32_t*       p = ids;
        for (int64_t s = 0; s < n_seq; ++s) {
            kv_cache* c = caches[s];
            if (rope_needs_reprefill(c->n_past, n_tokens[s])) {
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
        // A re-run sequence that wants all its rows gets only those of its new tokens: the rows of
        // its history are computed into a scratch buffer and dropped.
        std::vector<int64_t> history(static_cast<size_t>(n_seq));
        bool                 drop = false;
        for (int64_t s = 0; s < n_seq; ++s) {
            history[static_cast<size_t>(s)] = all_n[static_cast<size_t>(s)] - n_tokens[s];
            drop = drop || (all_logits && all_logits[s] && history[static_cast<size_t>(s)] > 0);
        }
        if (!drop) return forward_batch(ctx, all_ids.data(), all_n.data(), n_seq, caches, logits, all_logits, loras);
        int64_t n_rows = 0;
        for (int64_t s = 0; s < n_seq; ++s) n_rows += all_logits[s] ? all_n[static_cast<size_t>(s)] : 1;
        std::vector<float> scratch(static_cast<size_t>(n_rows * hp_.n_vocab));
        GPTQ_TRY(forward_batch(ctx, all_ids.data(), all_n.data(), n_seq, caches, scratch.data(), all_logits, loras));
        const float* src = scratch.data();
        float*       dst = logits;
        for (int64_t s = 0; s < n_seq; ++s) {
            const int64_t rows = all_logits[s] ? n_tokens[s] : 1;
            if (all_logits[s]) src += history[static_cast<size_t>(s)] * hp_.n_vocab;
            dst = std::copy_n(src, rows * hp_.n_vocab, dst);
            src += rows * hp_.n_vocab;
        }
        return status::ok();
    }
    std::vector<layer_seq> seqs(static_cast<size_t>(n_seq));
    for (int64_t s = 0; s < n_seq; ++s)
        seqs[static_cast<size_t>(s)] = {n_tokens[s], caches[s]->n_past, caches[s], loras ? loras[s] : -1};
    std::vector<float> hidden;  // [sum n_tokens, n_embd]
    GPTQ_TRY(layers_run(ctx, ids, seqs, &hidden));
    // Only the rows asked for (each sequence's last, or all of its rows) go through the final norm
    // and lm_head: out[n_out, n_embd].
    std::vector<float> out;
    int64_t            row0 = 0, n_out = 0;
    for (int64_t s = 0; s < n_seq; ++s) {
        const int64_t first = all_logits && all_logits[s] ? row0 : row0 + n_tokens[s] - 1;
        const int64_t rows  = row0 + n_tokens[s] - first;
        out.insert(out.end(), hidden.begin() + first * hp_.n_embd, hidden.begin() + (first + rows) * hp_.n_embd);
        n_out += rows;
        row0 += n_tokens[s];
        caches[s]->n_past += n_tokens[s];
        caches[s]->ids.insert(caches[s]->ids.end(), ids + row0 - n_tokens[s], ids + row0);
    }
    output_logits(ctx, out.data(), n_out, logits);
    return status::ok();
}

}  // namespace gptq
