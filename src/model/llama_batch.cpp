// Ragged-batch forward pass for generation (llama.h: forward_batch): several independent
// sequences, each with its own KV cache and any number of new tokens, in one pass. The rows of all
// sequences are stacked ([sum n_tokens, features], no padding), so every linear (q/k/v/o, MLP,
// lm_head) is one matmul over the whole batch; only RoPE (positions differ) and attention (each
// sequence sees its own cache) run per sequence. The math per row is layer_forward's.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/llama.h"

namespace gptq {

void llama_model::layer_forward_batch(const ops_context& ctx, const llama_layer& layer, float* hidden,
                                      const int64_t* n_tokens, int64_t n_seq, kv_cache* const* caches) const {
    const int64_t n_embd = hp_.n_embd, q_dim = hp_.q_dim(), kv_dim = hp_.kv_dim(), hd = hp_.head_dim;
    const int64_t i_layer = layer.index;
    int64_t       n_rows  = 0;
    for (int64_t s = 0; s < n_seq; ++s) n_rows += n_tokens[s];
    auto lin = [&](linear_role r, const float* x, float* y) {
        const linear_weights& l = layer.linear(r);
        linear_forward(ctx, l, x, y, n_rows);
    };

    // ---- attention: q/k/v over all rows, then RoPE + cache + attention per sequence ---------------
    std::vector<float> x(static_cast<size_t>(n_rows * std::max(n_embd, q_dim)));  // [n_rows, n_embd]
    op_rms_norm(ctx, hidden, layer.attn_norm.data(), x.data(), n_rows, n_embd, hp_.rms_eps);
    std::vector<float> q(static_cast<size_t>(n_rows * q_dim));                // [n_rows, q_dim]
    std::vector<float> k(static_cast<size_t>(n_rows * kv_dim)), v(k.size());  // [n_rows, kv_dim]
    lin(linear_role::LINEAR_Q, x.data(), q.data());
    lin(linear_role::LINEAR_K, x.data(), k.data());
    lin(linear_role::LINEAR_V, x.data(), v.data());

    const int64_t      half = hd / 2;
    std::vector<float> cos, sin;
    int64_t            row0 = 0;
    for (int64_t s = 0; s < n_seq; ++s) {
        const int64_t n  = n_tokens[s];
        kv_cache&     c  = *caches[s];
        const int64_t p0 = c.n_past;  // this call advances n_past only after the last layer
        float*        qs = q.data() + row0 * q_dim;
        float*        ks = k.data() + row0 * kv_dim;
        // Dynamic RoPE depends on the sequence's length so far, as in layer_forward.
        const std::vector<float> inv_freq = llama_rope_inv_freq(hp_, p0 + n);
        cos.resize(static_cast<size_t>(n * half));
        sin.resize(cos.size());
        op_rope_tables(inv_freq.data(), half, p0, n, 1.0f, cos.data(), sin.data());
        op_rope(ctx, qs, cos.data(), sin.data(), n, hp_.n_head, hd, q_dim);
        op_rope(ctx, ks, cos.data(), sin.data(), n, hp_.n_head_kv, hd, kv_dim);
        float* ck = c.k[static_cast<size_t>(i_layer)].data() + p0 * kv_dim;
        float* cv = c.v[static_cast<size_t>(i_layer)].data() + p0 * kv_dim;
        std::copy_n(ks, n * kv_dim, ck);
        std::copy_n(v.data() + row0 * kv_dim, n * kv_dim, cv);

        attention_args a;
        a.q         = qs;
        a.k         = c.k[static_cast<size_t>(i_layer)].data();
        a.v         = c.v[static_cast<size_t>(i_layer)].data();
        a.out       = x.data() + row0 * q_dim;  // x is free again: [n_rows, q_dim]
        a.n_q       = n;
        a.n_kv      = p0 + n;
        a.q_pos0    = p0;
        a.n_head    = hp_.n_head;
        a.n_head_kv = hp_.n_head_kv;
        a.head_dim  = hd;
        a.window    = hp_.window[static_cast<size_t>(i_layer)];
        a.scale     = 1.0f / std::sqrt(static_cast<float>(hd));
        a.q_stride = a.out_stride = q_dim;
        a.kv_stride               = kv_dim;
        op_attention(ctx, a);
        row0 += n;
    }
    std::vector<float> y(static_cast<size_t>(n_rows * n_embd));  // [n_rows, n_embd]
    lin(linear_role::LINEAR_O, x.data(), y.data());
    op_add(ctx, hidden, y.data(), n_rows * n_embd);

    // ---- MLP, all rows at once -------------------------------------------------------------------
    op_rms_norm(ctx, hidden, layer.mlp_norm.data(), y.data(), n_rows, n_embd, hp_.rms_eps);
    std::vector<float> gate(static_cast<size_t>(n_rows * hp_.n_ff)), up(gate.size());  // [n_rows, n_ff]
    lin(linear_role::LINEAR_GATE, y.data(), gate.data());
    lin(linear_role::LINEAR_UP, y.data(), up.data());
    op_silu_mul(ctx, gate.data(), up.data(), gate.data(), n_rows * hp_.n_ff);
    lin(linear_role::LINEAR_DOWN, gate.data(), y.data());
    op_add(ctx, hidden, y.data(), n_rows * n_embd);
}

status llama_model::forward_batch(const ops_context& ctx, const int32_t* ids, const int64_t* n_tokens, int64_t n_seq,
                                  kv_cache* const* caches, float* logits) {
    int64_t n_rows = 0;
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
        n_rows += n_tokens[s];
    }
    if (n_seq == 0) return status::ok();
    GPTQ_TRY(layers_load_all());
    std::vector<float> hidden(static_cast<size_t>(n_rows * hp_.n_embd));  // [n_rows, n_embd]
    GPTQ_TRY(embed(ids, n_rows, hidden.data()));
    for (int64_t i = 0; i < hp_.n_layer; ++i)
        layer_forward_batch(ctx, *layers_[static_cast<size_t>(i)], hidden.data(), n_tokens, n_seq, caches);
    // Only each sequence's last row goes through the final norm and lm_head.
    std::vector<float> last(static_cast<size_t>(n_seq * hp_.n_embd));  // [n_seq, n_embd]
    int64_t            row = 0;
    for (int64_t s = 0; s < n_seq; ++s) {
        row += n_tokens[s];
        std::copy_n(hidden.data() + (row - 1) * hp_.n_embd, hp_.n_embd, last.data() + s * hp_.n_embd);
        caches[s]->n_past += n_tokens[s];
    }
    output_logits(ctx, last.data(), n_seq, logits);
    return status::ok();
}

}  // namespace gptq
