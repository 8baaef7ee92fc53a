// LoRA training on the CPU (issue 21 Part 2, docs/lora.md "Fine-tuning"): the loss of a batch and
// its gradients with respect to one adapter's A and B, the base model frozen.
//
// Forward: the inference layer itself (layer_forward with the adapter on every sequence), keeping
// only each layer's input (gradient checkpointing: n_layer * n_rows * n_embd floats). Loss: final
// norm + lm_head over the rows that have a target, in chunks (a chunk's logits only), cross-entropy
// summed in double. Backward, last layer first: the layer is recomputed from its kept input with
// its intermediates (norms, q/k/v, RoPE, attention, gate/up), then every op's backward
// (ops/ops_backward.h) in reverse; a linear passes dy W back (W dequantized a block of rows at a
// time when GPTQ) plus its LoRA product's gradient, and adds its A and B gradients:
//     y = x W^T + s (x A^T) B^T,  t = x A^T:   dB += s dy^T t,  dA += s (dy B)^T x,  dx = dy W + s (dy B) A
#include <algorithm>
#include <cmath>

#include "core/dropout_mask.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/llama.h"
#include "model/lora.h"
#include "ops/linalg.h"
#include "ops/ops_backward.h"

namespace gptq {

namespace {
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
// Rows of logits computed at a time in the loss: 128 x a 128k vocabulary is 64 MiB of F32.
constexpr int64_t k_loss_rows = 128;

int64_t rows_of(std::span<const layer_seq> seqs) {
    int64_t n = 0;
    for (const layer_seq& s : seqs) n += s.n_tokens;
    return n;
}

using fvec = std::vector<float>;
fvec zeros(int64_t n) {
    return fvec(static_cast<size_t>(n), 0.0f);
}
}  // namespace

int64_t train_batch::n_targets() const {
    return std::count_if(targets.begin(), targets.end(), [](int32_t t) { return t >= 0; });
}

status llama_train_check(const llama_hparams& hp, const std::string& who) {
    if (const std::string opts = hp.options_beyond_llama(); !opts.empty())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: {} uses {}; LoRA training runs the Llama / Mistral / Qwen2 layer only (docs/lora.md "
                          "\"Fine-tuning\")",
                          who, model_family_name(hp.family), opts);
    return status::ok();
}

void lora_dropout_rows(const lora_dropout_spec& d, int64_t layer, linear_role r, const float* x, float* out,
                       int64_t row0, int64_t n_rows, int64_t n_in) {
    const uint64_t key       = dropout_module_key(d.seed, layer, static_cast<int>(r));
    const uint32_t threshold = dropout_threshold(d.p);
    const float    inv       = static_cast<float>(1.0 / (1.0 - d.p));
    for (int64_t i = 0; i < n_rows; ++i)
        for (int64_t c = 0; c < n_in; ++c) {
            const int64_t e = i * n_in + c;
            out[e]          = dropout_keep(key, (row0 + i) * n_in + c, threshold) ? x[e] * inv : 0.0f;
        }
}

void linear_backward_input(const ops_context& ctx, const linear_weights& l, const float* dy, float* dx, int64_t n_rows,
                           bool accumulate) {
    if (l.q)
        op_gptq_linear_backward_input(ctx, dy, *l.q, dx, n_rows, accumulate);
    else if (!l.w16.empty())
        op_linear_f16_backward_input(ctx, dy, l.w16.data(), dx, n_rows, l.n_out, l.n_in, accumulate);
    else
        op_linear_backward_input(ctx, dy, l.w.data(), dx, n_rows, l.n_out, l.n_in, accumulate);
}

void llama_model::lora_linear_backward(const ops_context& ctx, const llama_layer& layer, linear_role r, int64_t n,
                                       const float* x, const float* dy, float* dx, bool accumulate,
                                       const lora_adapter* adapter, lora_adapter* grads) const {
    const linear_weights& l = layer.linear(r);
    linear_backward_input(ctx, l, dy, dx, n, accumulate);
    const lora_module* m = adapter ? adapter->module(layer.index, r) : nullptr;
    if (!m) return;
    lora_module&  g    = grads->layers[static_cast<size_t>(layer.index)][static_cast<size_t>(r)];
    const int64_t rank = m->r, n_in = l.n_in, n_out = l.n_out;
    GPTQ_ASSERT(g.r == rank && g.a.size() == m->a.size() && g.b.size() == m->b.size());
    fvec t = zeros(n * rank), dt = zeros(n * rank);  // [n, r]
    fvec xd;  // with dropout: the branch's dropped input, the mask of the forward pass
    if (dropout_.p > 0) {
        xd = zeros(n * n_in);
        lora_dropout_rows(dropout_, layer.index, r, x, xd.data(), 0, n, n_in);
        x = xd.data();
    }
    op_sgemm(ctx, false, true, n, rank, n_in, 1.0f, x, n_in, m->a.data(), n_in, 0.0f, t.data(), rank);
    op_sgemm(ctx, true, false, n_out, rank, n, m->scale, dy, n_out, t.data(), rank, 1.0f, g.b.data(), rank);
    op_sgemm(ctx, false, false, n, rank, n_out, m->scale, dy, n_out, m->b.data(), rank, 0.0f, dt.data(), rank);
    op_sgemm(ctx, true, false, rank, n_in, n, 1.0f, dt.data(), rank, x, n_in, 1.0f, g.a.data(), n_in);
    if (dropout_.p == 0) {
        op_sgemm(ctx, false, false, n, n_in, rank, 1.0f, dt.data(), rank, m->a.data(), n_in, 1.0f, dx, n_in);
        return;
    }
    // dx += dropout's backward of (dy B) A: the same mask and scale.
    op_sgemm(ctx, false, false, n, n_in, rank, 1.0f, dt.data(), rank, m->a.data(), n_in, 0.0f, xd.data(), n_in);
    lora_dropout_rows(dropout_, layer.index, r, xd.data(), xd.data(), 0, n, n_in);
    op_add(ctx, dx, xd.data(), n * n_in);
}

void llama_model::layer_backward(const ops_context& ctx, const llama_layer& layer, const float* x0,
                                 std::span<const layer_seq> seqs, float* dh, const lora_adapter* adapter,
                                 lora_adapter* grads) const {
    const int64_t n = rows_of(seqs), E = hp_.n_embd, qd = hp_.q_dim(), kvd = hp_.kv_dim(), hd = hp_.head_dim;
    const int64_t F = hp_.n_ff, half = hd / 2, i_layer = layer.index;
    auto          lin      = [&](linear_role r, const float* x, float* y) { linear_run(ctx, layer, r, seqs, x, y); };
    auto          lin_back = [&](linear_role r, const float* x, const float* dy, float* dx, bool acc) {
        lora_linear_backward(ctx, layer, r, n, x, dy, dx, acc, adapter, grads);
    };
    // Attention's forward again, keeping what its backward reads.
    fvec xn = zeros(n * E);
    op_rms_norm(ctx, x0, layer.attn_norm.data(), xn.data(), n, E, hp_.rms_eps);
    fvec q = zeros(n * qd), k = zeros(n * kvd), v = zeros(n * kvd);
    lin(linear_role::LINEAR_Q, xn.data(), q.data());
    lin(linear_role::LINEAR_K, xn.data(), k.data());
    lin(linear_role::LINEAR_V, xn.data(), v.data());
    fvec                        cos = zeros(n * half), sin = zeros(n * half), att = zeros(n * qd);
    std::vector<attention_args> args;
    int64_t                     row0 = 0;
    for (const layer_seq& s : seqs) {  // local K/V from position 0 (layer_forward's cache-less path)
        GPTQ_ASSERT(s.pos0 == 0 && !s.cache);
        const rope_config& rope = hp_.rope_of(i_layer);
        const fvec         inv  = llama_rope_inv_freq(hp_, rope, s.n_tokens);
        float *            c = cos.data() + row0 * half, *sn = sin.data() + row0 * half;
        op_rope_tables(inv.data(), half, 0, s.n_tokens, llama_rope_attention_factor(rope), c, sn);
        op_rope(ctx, q.data() + row0 * qd, c, sn, s.n_tokens, hp_.n_head, hd, qd);
        op_rope(ctx, k.data() + row0 * kvd, c, sn, s.n_tokens, hp_.n_head_kv, hd, kvd);
        attention_args a;
        a.q         = q.data() + row0 * qd;
        a.k         = k.data() + row0 * kvd;
        a.v         = v.data() + row0 * kvd;
        a.out       = att.data() + row0 * qd;
        a.n_q       = s.n_tokens;
        a.n_kv      = s.n_tokens;
        a.q_pos0    = 0;
        a.n_head    = hp_.n_head;
        a.n_head_kv = hp_.n_head_kv;
        a.head_dim  = hd;
        a.window    = hp_.window[static_cast<size_t>(i_layer)];
        a.scale     = hp_.attn_scale;
        a.softcap   = hp_.attn_softcap;
        a.q_stride = a.out_stride = qd;
        a.kv_stride               = kvd;
        op_attention(ctx, a);
        args.push_back(a);
        row0 += s.n_tokens;
    }
    fvec h1(x0, x0 + n * E);
    {
        fvec y = zeros(n * E);
        lin(linear_role::LINEAR_O, att.data(), y.data());
        op_add(ctx, h1.data(), y.data(), n * E);
    }
    fvec dx = zeros(n * E);
    {  // The MLP's forward again, then its backward: dh = dL/dh2 -> dL/dh1 (residual plus the block's
       // path). Its buffers end here; dL/d(act) becomes dL/dgate and up's buffer dL/dup in place.
        fvec yn = zeros(n * E), g = zeros(n * F), u = zeros(n * F), da = zeros(n * F);
        op_rms_norm(ctx, h1.data(), layer.mlp_norm.data(), yn.data(), n, E, hp_.rms_eps);
        lin(linear_role::LINEAR_GATE, yn.data(), g.data());
        lin(linear_role::LINEAR_UP, yn.data(), u.data());
        {
            fvec act = zeros(n * F);
            op_silu_mul(ctx, g.data(), u.data(), act.data(), n * F);
            lin_back(linear_role::LINEAR_DOWN, act.data(), dh, da.data(), false);
        }
        op_silu_mul_backward(ctx, g.data(), u.data(), da.data(), da.data(), u.data(), n * F);
        lin_back(linear_role::LINEAR_GATE, yn.data(), da.data(), dx.data(), false);
        lin_back(linear_role::LINEAR_UP, yn.data(), u.data(), dx.data(), true);
        op_rms_norm_backward(ctx, h1.data(), layer.mlp_norm.data(), dx.data(), dx.data(), n, E, hp_.rms_eps);
        op_add(ctx, dh, dx.data(), n * E);
    }

    // Attention backward: dL/dh1 -> dL/dx0.
    fvec datt = zeros(n * qd), dq = zeros(n * qd), dk = zeros(n * kvd), dv = zeros(n * kvd);
    lin_back(linear_role::LINEAR_O, att.data(), dh, datt.data(), false);
    row0 = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
        const int64_t nt = seqs[i].n_tokens;
        op_attention_backward(ctx, args[i], datt.data() + row0 * qd, dq.data() + row0 * qd, dk.data() + row0 * kvd,
                              dv.data() + row0 * kvd);
        const float *c = cos.data() + row0 * half, *sn = sin.data() + row0 * half;
        op_rope_backward(ctx, dq.data() + row0 * qd, c, sn, nt, hp_.n_head, hd, qd);
        op_rope_backward(ctx, dk.data() + row0 * kvd, c, sn, nt, hp_.n_head_kv, hd, kvd);
        row0 += nt;
    }
    lin_back(linear_role::LINEAR_Q, xn.data(), dq.data(), dx.data(), false);
    lin_back(linear_role::LINEAR_K, xn.data(), dk.data(), dx.data(), true);
    lin_back(linear_role::LINEAR_V, xn.data(), dv.data(), dx.data(), true);
    op_rms_norm_backward(ctx, x0, layer.attn_norm.data(), dx.data(), dx.data(), n, E, hp_.rms_eps);
    op_add(ctx, dh, dx.data(), n * E);
}

void llama_model::lm_head_backward_input(const ops_context& ctx, const float* dlogits, float* dx, int64_t n) const {
    if (lm_head_.q || !lm_head_.w16.empty())  // the branches of output_logits
        linear_backward_input(ctx, lm_head_, dlogits, dx, n, false);
    else if (hp_.tie_embeddings && !embed16_.empty())
        op_linear_f16_backward_input(ctx, dlogits, embed16_.data(), dx, n, hp_.n_vocab, hp_.n_embd, false);
    else
        op_linear_backward_input(ctx, dlogits, hp_.tie_embeddings ? embed_.data() : lm_head_.w.data(), dx, n,
                                 hp_.n_vocab, hp_.n_embd, false);
}

double llama_model::output_loss_grad(const ops_context& ctx, const float* hidden, const int32_t* targets, int64_t n,
                                     float grad_scale, float* dh) const {
    const int64_t        E = hp_.n_embd, V = hp_.n_vocab;
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < n; ++i)
        if (targets[i] >= 0) rows.push_back(i);
    const int64_t       n_t = static_cast<int64_t>(rows.size());
    fvec                h   = zeros(std::min(n_t, k_loss_rows) * E), dx(h.size()), logits(h.size() / E * V);
    std::vector<double> nll(static_cast<size_t>(std::min(n_t, k_loss_rows)));
    double              total = 0.0;
    for (int64_t c0 = 0; c0 < n_t; c0 += k_loss_rows) {
        const int64_t nc = std::min(k_loss_rows, n_t - c0);
        for (int64_t i = 0; i < nc; ++i)
            std::copy_n(hidden + rows[static_cast<size_t>(c0 + i)] * E, E, h.data() + i * E);
        output_logits(ctx, h.data(), nc, logits.data());
        // Per row: NLL = logsumexp - logit[target]; dlogits = (softmax - onehot) * grad_scale.
        auto row_fn = [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                float*        l  = logits.data() + i * V;
                const int32_t t  = targets[rows[static_cast<size_t>(c0 + i)]];
                const float   mx = *std::max_element(l, l + V);
                double        s  = 0.0;
                for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<double>(l[j]) - mx);
                const double lse            = mx + std::log(s);
                nll[static_cast<size_t>(i)] = lse - l[t];
                if (!dh) continue;
                for (int64_t j = 0; j < V; ++j) l[j] = static_cast<float>(std::exp(l[j] - lse) * grad_scale);
                l[t] -= grad_scale;
            }
        };
        if (ctx.pool && nc > 1)
            ctx.pool->parallel_for(nc, row_fn);
        else
            row_fn(0, nc);
        for (int64_t i = 0; i < nc; ++i) total += nll[static_cast<size_t>(i)];
        if (!dh) continue;
        lm_head_backward_input(ctx, logits.data(), dx.data(), nc);
        op_rms_norm_backward(ctx, h.data(), norm_.data(), dx.data(), dx.data(), nc, E, hp_.rms_eps);
        for (int64_t i = 0; i < nc; ++i) std::copy_n(dx.data() + i * E, E, dh + rows[static_cast<size_t>(c0 + i)] * E);
    }
    return total;
}

result<double> llama_model::lora_loss_grad(const ops_context& ctx, const train_batch& b, int32_t lora,
                                           lora_adapter* grads, float grad_scale, lora_dropout_spec dropout) {
    GPTQ_TRY(llama_train_check(hp_, src_->folder()));
    if (!(dropout.p >= 0 && dropout.p < 1)) return make_error(E_ARG, "LoRA dropout {}: must be in [0, 1)", dropout.p);
    struct dropout_scope {  // the forward (linear_run) and the backward see it during this call only
        lora_dropout_spec& d;
        ~dropout_scope() { d = {}; }
    } scope{dropout_};
    dropout_ = dropout;
    if (lora < -1 || lora >= static_cast<int32_t>(loras_.size()))
        return make_error(E_ARG, "LoRA adapter {} is not loaded ({} are)", lora, loras_.size());
    const int64_t n   = static_cast<int64_t>(b.ids.size());
    int64_t       sum = 0;
    for (int64_t t : b.n_tokens) {
        if (t < 1) return make_error(E_ARG, "train batch: a sequence of {} tokens", t);
        sum += t;
    }
    if (sum != n || static_cast<int64_t>(b.targets.size()) != n)
        return make_error(E_ARG, "train batch: {} ids, {} targets, sequences of {} tokens in all", n, b.targets.size(),
                          sum);
    for (int64_t i = 0; i < n; ++i)
        if (b.targets[static_cast<size_t>(i)] >= hp_.n_vocab)
            return make_error(E_ARG, "train batch: target {} at row {} is outside the vocabulary [0, {})",
                              b.targets[static_cast<size_t>(i)], i, hp_.n_vocab);
    const lora_adapter* adapter = lora >= 0 ? loras_[static_cast<size_t>(lora)].get() : nullptr;
    if (grads) GPTQ_ASSERT(adapter && grads->layers.size() == adapter->layers.size());
    GPTQ_TRY(layers_load_all());
    GPTQ_TRY(globals_load());
    std::vector<layer_seq> seqs;
    for (int64_t t : b.n_tokens) seqs.push_back({t, 0, nullptr, lora});
    const int64_t     E      = hp_.n_embd;
    fvec              hidden = zeros(n * E);
    std::vector<fvec> inputs(static_cast<size_t>(hp_.n_layer));  // each layer's input (checkpoints)
    GPTQ_TRY(embed(b.ids.data(), n, hidden.data()));
    for (int64_t i = 0; i < hp_.n_layer; ++i) {
        if (grads) inputs[static_cast<size_t>(i)] = hidden;
        layer_forward(ctx, *layers_[static_cast<size_t>(i)], hidden.data(), seqs);
    }
    fvec         dh = grads ? zeros(n * E) : fvec();
    const double loss =
        output_loss_grad(ctx, hidden.data(), b.targets.data(), n, grad_scale, grads ? dh.data() : nullptr);
    if (!grads) return loss;
    for (int64_t i = hp_.n_layer - 1; i >= 0; --i) {
        layer_backward(ctx, *layers_[static_cast<size_t>(i)], inputs[static_cast<size_t>(i)].data(), seqs, dh.data(),
                       adapter, grads);
        inputs[static_cast<size_t>(i)] = fvec();
    }
    return loss;
}

}  // namespace gptq
