// --bpw-sensitivity output (bpw_output.h): the unquantized model's output distribution on a few
// calibration windows, and the KL divergence from it of the model with one layer's variant.
#include "bpw_output.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "host_memory.h"

namespace gptq {

namespace {

// The variants' hidden states held at once (each [n_windows * seqlen, n_embd] F32): at most 64 and
// at most 1 GiB (at least one); more variants run in further sweeps over the later layers (each
// loads them again).
constexpr uint64_t k_state_budget = uint64_t(1) << 30;

size_t states_at_once(uint64_t state_bytes) {
    return static_cast<size_t>(std::clamp<uint64_t>(k_state_budget / state_bytes, 1, 64));
}

}  // namespace

output_sensitivity::output_sensitivity(const llama_model& model, const ops_context& ctx, thread_pool* pool,
                                       int64_t n_windows, int64_t seqlen, std::vector<float> x)
    : model_(model), ctx_(ctx), pool_(pool), n_windows_(n_windows), seqlen_(seqlen), x_(std::move(x)) {
    seqs_.assign(static_cast<size_t>(n_windows), layer_seq{seqlen, 0, nullptr, -1});
}

result<std::unique_ptr<output_sensitivity>> output_sensitivity::make(const llama_model& model, const ops_context& ctx,
                                                                     thread_pool* pool, int64_t n_windows,
                                                                     int64_t seqlen, std::vector<float> x) {
    const llama_hparams& hp = model.hparams();
    if (n_windows <= 0 || seqlen <= 0 || static_cast<int64_t>(x.size()) != n_windows * seqlen * hp.n_embd)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "--bpw-sensitivity output: {} values for {} windows of {} tokens of width {}", x.size(),
                          n_windows, seqlen, hp.n_embd);
    const uint64_t rows  = static_cast<uint64_t>(n_windows * seqlen);
    const uint64_t state = rows * static_cast<uint64_t>(hp.n_embd) * 4;
    const uint64_t need  = rows * static_cast<uint64_t>(hp.n_vocab) * 4 + rows * 8 + state +
                          states_at_once(state) * state + static_cast<uint64_t>(seqlen * hp.n_vocab) * 4;
    GPTQ_TRY(
        host_memory_check("--bpw-sensitivity output (the reference distributions of the windows, their hidden "
                          "states and the variants')",
                          need, "lower --bpw-windows or use --bpw-sensitivity hessian"));
    std::unique_ptr<output_sensitivity> o(new output_sensitivity(model, ctx, pool, n_windows, seqlen, std::move(x)));
    GPTQ_TRY(o->reference());
    return o;
}

void output_sensitivity::forward(const llama_layer& layer, float* hidden) const {
    model_.layer_forward(ctx_, layer, hidden, seqs_);
}

// The unquantized model over the windows: the reference probabilities p and sum_v p log p per token.
status output_sensitivity::reference() {
    const llama_hparams& hp = model_.hparams();
    std::vector<float>   h  = x_;
    for (int64_t j = 0; j < hp.n_layer; ++j) {
        GPTQ_ASSIGN_OR_RETURN(auto layer, model_.layer_load(j, pool_));
        forward(*layer, h.data());
    }
    const int64_t rows = n_tokens(), nv = hp.n_vocab;
    p_ref_.resize(static_cast<size_t>(rows * nv));
    negent_.assign(static_cast<size_t>(rows), 0.0);
    for (int64_t w = 0; w < n_windows_; ++w) {
        float* lp = p_ref_.data() + w * seqlen_ * nv;
        model_.output_logits(ctx_, h.data() + w * seqlen_ * hp.n_embd, seqlen_, lp);
        op_log_softmax(ctx_, lp, lp, seqlen_, nv);
        for (int64_t t = 0; t < seqlen_; ++t) {
            float* row = lp + t * nv;
            double s   = 0.0;
            for (int64_t v = 0; v < nv; ++v) {
                const float p = std::exp(row[v]);
                s += double(p) * double(row[v]);
                row[v] = p;
            }
            negent_[static_cast<size_t>(w * seqlen_ + t)] = s;
        }
    }
    return status::ok();
}

// KL(p || q) = sum_v p log p - sum_v p log q per token, summed in a fixed order (deterministic),
// averaged over the tokens. An unchanged model gives exactly 0 (the same log q as the reference's).
double output_sensitivity::kl_of(const std::function<void(int64_t, float*)>& logits) const {
    const int64_t      nv = model_.hparams().n_vocab;
    std::vector<float> lq(static_cast<size_t>(seqlen_ * nv));
    double             sum = 0.0;
    for (int64_t w = 0; w < n_windows_; ++w) {
        logits(w, lq.data());
        op_log_softmax(ctx_, lq.data(), lq.data(), seqlen_, nv);
        for (int64_t t = 0; t < seqlen_; ++t) {
            const float* p   = p_ref_.data() + (w * seqlen_ + t) * nv;
            const float* q   = lq.data() + t * nv;
            double       dot = 0.0;
            for (int64_t v = 0; v < nv; ++v) dot += double(p[v]) * double(q[v]);
            sum += negent_[static_cast<size_t>(w * seqlen_ + t)] - dot;
        }
    }
    return sum / double(n_tokens());
}

result<std::vector<double>> output_sensitivity::layer_variants(
    llama_layer& layer, size_t n, const std::function<result<layer_variant>(size_t)>& make) {
    const llama_hparams& hp    = model_.hparams();
    const uint64_t       state = static_cast<uint64_t>(n_tokens() * hp.n_embd) * 4;
    const size_t         chunk = states_at_once(state);
    std::vector<double>  kl(n, 0.0);
    for (size_t k0 = 0; k0 < n; k0 += chunk) {
        const size_t                    k1 = std::min(n, k0 + chunk);
        std::vector<std::vector<float>> states;
        for (size_t k = k0; k < k1; ++k) {
            GPTQ_ASSIGN_OR_RETURN(layer_variant v, make(k));
            layer_variant own;  // the layer's weights, given back after the pass
            for (auto& [r, w] : v) {
                own.emplace_back(r, layer.linear(r).w);
                GPTQ_TRY(layer.linear_replace(r, std::move(w)));
            }
            states.push_back(x_);
            forward(layer, states.back().data());
            for (auto& [r, w] : own) GPTQ_TRY(layer.linear_replace(r, std::move(w)));
        }
        for (int64_t j = layer.index + 1; j < hp.n_layer; ++j) {
            GPTQ_ASSIGN_OR_RETURN(auto later, model_.layer_load(j, pool_));
            for (auto& h : states) forward(*later, h.data());
        }
        for (size_t k = k0; k < k1; ++k) {
            const float* h = states[k - k0].data();
            kl[k]          = kl_of(
                [&](int64_t w, float* out) { model_.output_logits(ctx_, h + w * seqlen_ * hp.n_embd, seqlen_, out); });
        }
    }
    return kl;
}

status output_sensitivity::advance(const llama_layer& layer) {
    forward(layer, x_.data());
    return status::ok();
}

result<double> output_sensitivity::lm_head_variant(const std::vector<float>& w) {
    const llama_hparams& hp = model_.hparams();
    if (static_cast<int64_t>(w.size()) != hp.n_vocab * hp.n_embd)
        return make_error(status_code::STATUS_INTERNAL, "--bpw-sensitivity output: lm_head variant of {} values",
                          w.size());
    std::vector<float> x(static_cast<size_t>(seqlen_ * hp.n_embd));
    return kl_of([&](int64_t win, float* out) {
        model_.final_norm(ctx_, x_.data() + win * seqlen_ * hp.n_embd, seqlen_, x.data());
        op_linear(ctx_, x.data(), w.data(), nullptr, out, seqlen_, hp.n_vocab, hp.n_embd);
        if (hp.final_softcap > 0.0f) op_softcap(ctx_, out, seqlen_ * hp.n_vocab, hp.final_softcap);
    });
}

}  // namespace gptq
