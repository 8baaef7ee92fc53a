// The CPU calibration runner (calibration.h): llama_model::layer_forward window by window in F32,
// the Hessians through its hooks, gptq_quantize and hessian_weighted_error. The oracle the GPU
// runner is compared with.
#include "calibration.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>

#include "core/error.h"

namespace gptq {

namespace {

class cpu_calibration final : public calibration_runner {
public:
    cpu_calibration(const llama_model& model, const ops_context& ctx, int64_t n_samples, int64_t seqlen,
                    std::vector<float> x, std::vector<float> x_fp)
        : model_(model), ctx_(ctx), n_samples_(n_samples), seqlen_(seqlen), x_(std::move(x)), x_fp_(std::move(x_fp)) {}

    status layer_begin(const llama_layer&) override { return status::ok(); }  // layer_forward reads the layer

    bool two_streams() const override { return !x_fp_.empty(); }

    status layer_begin_fp(const llama_layer& layer) override {
        if (!two_streams()) return calibration_runner::layer_begin_fp(layer);
        if (layer.moe)
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "GPTAQ: layer {} is a mixture of experts, which --gptaq does not handle", layer.index);
        fp_layer_                = std::make_unique<llama_layer>();
        fp_layer_->index         = layer.index;
        fp_layer_->attn_norm     = layer.attn_norm;
        fp_layer_->mlp_norm      = layer.mlp_norm;
        fp_layer_->attn_out_norm = layer.attn_out_norm;
        fp_layer_->mlp_out_norm  = layer.mlp_out_norm;
        fp_layer_->q_norm        = layer.q_norm;
        fp_layer_->k_norm        = layer.k_norm;
        fp_layer_->linears       = layer.linears;
        return status::ok();
    }

    status hessians_collect(const llama_layer& layer, const std::vector<linear_role>& group) override {
        const llama_hparams& hp = model_.hparams();
        acc_.clear();
        cross_.clear();
        if (two_streams() && (!fp_layer_ || fp_layer_->index != layer.index))
            return make_error(status_code::STATUS_INTERNAL, "calibration: GPTAQ: layer {} has no layer_begin_fp",
                              layer.index);
        linear_input last = linear_input::LINEAR_INPUT_QKV;  // the pass can stop once this is seen
        for (linear_role r : group) {
            const linear_input in = linear_role_input(r);
            if (!acc_.count(in)) {
                acc_[in] = std::make_unique<hessian_accumulator>(hp.linear_shape(r)[1]);
                if (two_streams()) cross_[in] = std::make_unique<cross_accumulator>(hp.linear_shape(r)[1]);
            }
            last = std::max(last, in);
        }
        // GPTAQ: the full-precision layer's inputs of this window, by input, for the cross term.
        std::map<linear_input, std::vector<float>> fp_in;
        status                                     mismatch = status::ok();
        linear_input_hook fp_hook = [&](int64_t, linear_input which, const float* x, int64_t n_tokens, int64_t n_in) {
            if (acc_.count(which)) fp_in[which].assign(x, x + n_tokens * n_in);
        };
        linear_input_hook hook = [&](int64_t, linear_input which, const float* x, int64_t n_tokens, int64_t n_in) {
            auto it = acc_.find(which);
            if (it == acc_.end()) return;
            it->second->add(ctx_, x, n_tokens);
            if (!two_streams()) return;
            const auto& f = fp_in[which];
            if (static_cast<int64_t>(f.size()) != n_tokens * n_in) {
                mismatch = make_error(status_code::STATUS_INTERNAL,
                                      "calibration: GPTAQ: the {} input has {} values in the full-precision pass, {} "
                                      "in the quantized one",
                                      linear_input_name(which), f.size(), n_tokens * n_in);
                return;
            }
            cross_[which]->add(ctx_, f.data(), x, n_tokens);
        };
        // Each window on a scratch copy: the hidden states stay the layer's inputs.
        const int64_t      n_embd = hp.n_embd;
        std::vector<float> scratch;
        for (int64_t j = 0; j < n_samples_; ++j) {
            if (two_streams()) {
                const float* fj = x_fp_.data() + j * seqlen_ * n_embd;
                scratch.assign(fj, fj + seqlen_ * n_embd);
                model_.layer_forward(ctx_, *fp_layer_, scratch.data(), seqlen_, 0, nullptr, &fp_hook, last);
            }
            const float* xj = x_.data() + j * seqlen_ * n_embd;
            scratch.assign(xj, xj + seqlen_ * n_embd);
            model_.layer_forward(ctx_, layer, scratch.data(), seqlen_, 0, nullptr, &hook, last);
            GPTQ_TRY(mismatch);
        }
        return status::ok();
    }

    result<std::vector<float>> cross_term(linear_input in) override {
        auto it = cross_.find(in);
        if (it == cross_.end())
            return make_error(status_code::STATUS_INTERNAL,
                              "calibration: no GPTAQ cross term collected for the {} input", linear_input_name(in));
        return it->second->finish();
    }

    result<quantized_linear> solve_gptaq(const float* w, int64_t n_out, int64_t n_in, const std::vector<float>& h,
                                         const std::vector<float>& dxxt, const gptq_options& opt,
                                         gptq_stats* stats) override {
        return gptaq_quantize(ctx_, w, n_out, n_in, h.data(), dxxt.data(), opt, stats);
    }

    result<std::vector<float>> hessian(linear_input in) override {
        auto it = acc_.find(in);
        if (it == acc_.end())
            return make_error(status_code::STATUS_INTERNAL, "calibration: no Hessian collected for the {} input",
                              linear_input_name(in));
        return it->second->finish();
    }

    result<quantized_linear> solve(const float* w, int64_t n_out, int64_t n_in, const std::vector<float>& h,
                                   const gptq_options& opt, gptq_stats* stats) override {
        return gptq_quantize(ctx_, w, n_out, n_in, h.data(), opt, stats);
    }

    result<double> weighted_error(const float* w, const float* wq, int64_t n_out, int64_t n_in,
                                  const std::vector<float>& h) override {
        return hessian_weighted_error(ctx_, w, wq, n_out, n_in, h.data());
    }

    status linear_update(linear_role, const std::vector<float>&) override {
        return status::ok();  // the passes read the caller's llama_layer, which it updates
    }

    status moe_hessians_collect(const llama_layer& layer, linear_input in,
                                const std::vector<bool>& route_all) override {
        const llama_hparams& hp = model_.hparams();
        if (!layer.moe || (in != linear_input::LINEAR_INPUT_GATE_UP && in != linear_input::LINEAR_INPUT_DOWN))
            return make_error(status_code::STATUS_INTERNAL, "calibration: layer {} has no MoE block or input {}",
                              layer.index, linear_input_name(in));
        const bool gate_up = in == linear_input::LINEAR_INPUT_GATE_UP;
        // [0]: the shared expert (GATE_UP: every token, which route-all experts share); [e + 1]: expert e.
        auto& acc = moe_acc_[in];
        acc.clear();
        const int64_t n_in_shared = gate_up ? hp.n_embd : std::max<int64_t>(hp.n_ff_shared, 1);
        acc.push_back(std::make_unique<hessian_accumulator>(n_in_shared));
        for (int64_t e = 0; e < hp.n_expert; ++e)
            acc.push_back(std::make_unique<hessian_accumulator>(gate_up ? hp.n_embd : hp.n_ff_expert));
        if (gate_up) counts_.assign(static_cast<size_t>(hp.n_expert), 0);
        auto           routed = [&](int64_t e) { return e >= 0 && !(!gate_up && route_all[static_cast<size_t>(e)]); };
        moe_input_hook mhook  = [&](int64_t, int64_t e, linear_input which, const float* x, const int64_t*,
                                   int64_t n_tokens, int64_t) {
            if (which != in) return;
            if (e == k_moe_shared) {
                if (!gate_up) acc[0]->add(ctx_, x, n_tokens);  // GATE_UP: the block input below
                return;
            }
            if (gate_up) counts_[static_cast<size_t>(e)] += n_tokens;
            if (routed(e)) acc[static_cast<size_t>(e + 1)]->add(ctx_, x, n_tokens);
        };
        std::vector<float> h;
        linear_input_hook  hook = [&](int64_t, linear_input which, const float* x, int64_t n_tokens, int64_t) {
            if (which != linear_input::LINEAR_INPUT_GATE_UP) return;  // the block's input, every token
            if (gate_up) {
                acc[0]->add(ctx_, x, n_tokens);
                return;
            }
            for (int64_t e = 0; e < hp.n_expert; ++e)
                if (route_all[static_cast<size_t>(e)]) {  // every token through expert e, for its Hessian only
                    moe_expert_hidden(ctx_, hp, layer.moe->expert(e), x, n_tokens, &h);
                    acc[static_cast<size_t>(e + 1)]->add(ctx_, h.data(), n_tokens);
                }
        };
        const int64_t      n_embd = hp.n_embd;
        std::vector<float> scratch;
        for (int64_t j = 0; j < n_samples_; ++j) {
            const float* xj = x_.data() + j * seqlen_ * n_embd;
            scratch.assign(xj, xj + seqlen_ * n_embd);
            model_.layer_forward(ctx_, layer, scratch.data(), seqlen_, 0, nullptr, &hook, in, &mhook);
        }
        return status::ok();
    }

    result<std::vector<float>> moe_hessian(linear_input in, int64_t expert, bool all_tokens) override {
        auto it = moe_acc_.find(in);
        if (it == moe_acc_.end() || it->second.empty())
            return make_error(status_code::STATUS_INTERNAL, "calibration: no MoE Hessians collected for the {} input",
                              linear_input_name(in));
        const bool   shared_slot = expert == k_moe_shared || (all_tokens && in == linear_input::LINEAR_INPUT_GATE_UP);
        const size_t k           = shared_slot ? 0 : static_cast<size_t>(expert + 1);
        if (k >= it->second.size())
            return make_error(status_code::STATUS_INTERNAL, "calibration: expert {} out of range", expert);
        return it->second[k]->finish();
    }

    std::vector<int64_t> moe_token_counts() const override { return counts_; }

    status layer_forward(const llama_layer& layer) override {
        const int64_t n_embd = model_.hparams().n_embd;
        for (int64_t j = 0; j < n_samples_; ++j)
            model_.layer_forward(ctx_, layer, x_.data() + j * seqlen_ * n_embd, seqlen_, 0, nullptr);
        if (two_streams()) {
            if (!fp_layer_ || fp_layer_->index != layer.index)
                return make_error(status_code::STATUS_INTERNAL, "calibration: GPTAQ: layer {} has no layer_begin_fp",
                                  layer.index);
            for (int64_t j = 0; j < n_samples_; ++j)
                model_.layer_forward(ctx_, *fp_layer_, x_fp_.data() + j * seqlen_ * n_embd, seqlen_, 0, nullptr);
            fp_layer_.reset();
        }
        return status::ok();
    }

    result<std::vector<float>> final_norm_hessian() override {
        const int64_t n_embd = model_.hparams().n_embd;
        acc_.clear();
        hessian_accumulator acc(n_embd);
        std::vector<float>  y(static_cast<size_t>(seqlen_ * n_embd));
        for (int64_t j = 0; j < n_samples_; ++j) {
            model_.final_norm(ctx_, x_.data() + j * seqlen_ * n_embd, seqlen_, y.data());
            acc.add(ctx_, y.data(), seqlen_);
        }
        return acc.finish();
    }

private:
    const llama_model& model_;
    ops_context        ctx_;
    int64_t            n_samples_ = 0, seqlen_ = 0;
    std::vector<float> x_;  // [n_samples * seqlen, n_embd]
    // GPTAQ: the full-precision stream (same shape; empty: one stream), the layer's FP weights and
    // the cross terms of the last hessians_collect.
    std::vector<float>                                                        x_fp_;
    std::unique_ptr<llama_layer>                                              fp_layer_;
    std::map<linear_input, std::unique_ptr<cross_accumulator>>                cross_;
    std::map<linear_input, std::unique_ptr<hessian_accumulator>>              acc_;
    std::map<linear_input, std::vector<std::unique_ptr<hessian_accumulator>>> moe_acc_;  // [shared, experts...]
    std::vector<int64_t>                                                      counts_;   // tokens per expert
};

}  // namespace

status calibration_runner::moe_hessians_collect(const llama_layer& layer, linear_input, const std::vector<bool>&) {
    return make_error(status_code::STATUS_UNSUPPORTED,
                      "calibration: layer {} is a mixture of experts, which this calibration runner does not run yet; "
                      "use --device cpu",
                      layer.index);
}

namespace {
status no_two_streams() {
    return make_error(status_code::STATUS_UNSUPPORTED,
                      "GPTAQ (--gptaq) needs the CPU calibration runner opened with the full-precision stream "
                      "(--device cpu)");
}
}  // namespace

status calibration_runner::layer_begin_fp(const llama_layer&) {
    return no_two_streams();
}

result<std::vector<float>> calibration_runner::cross_term(linear_input) {
    return no_two_streams();
}

result<quantized_linear> calibration_runner::solve_gptaq(const float*, int64_t, int64_t, const std::vector<float>&,
                                                         const std::vector<float>&, const gptq_options&, gptq_stats*) {
    return no_two_streams();
}

result<std::vector<float>> calibration_runner::moe_hessian(linear_input, int64_t, bool) {
    return make_error(status_code::STATUS_UNSUPPORTED, "calibration: no MoE Hessians on this runner");
}

bool quantize_plain_mode() {
    const char* v = std::getenv("GPTQ_QUANTIZE_PLAIN");
    return v && std::string(v) == "1";
}

namespace {
status not_resident() {
    return make_error(status_code::STATUS_INTERNAL, "calibration: this runner keeps nothing on a device (resident())");
}
}  // namespace

status calibration_runner::hessian_keep(linear_input) {
    return not_resident();
}

result<quantized_linear> calibration_runner::solve_kept(linear_role, const float*, int64_t, int64_t,
                                                        const gptq_options&, gptq_stats*) {
    return not_resident();
}

result<double> calibration_runner::weighted_error_kept(const quantized_linear*) {
    return not_resident();
}

status calibration_runner::linear_update_kept(linear_role) {
    return not_resident();
}

result<std::unique_ptr<calibration_runner>> calibration_runner_cpu(const llama_model& model, const ops_context& ctx,
                                                                   int64_t n_samples, int64_t seqlen,
                                                                   std::vector<float> x, std::vector<float> x_fp) {
    if (n_samples <= 0 || seqlen <= 0 || static_cast<int64_t>(x.size()) != n_samples * seqlen * model.hparams().n_embd)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "calibration: {} values for {} windows of {} tokens of width {}", x.size(), n_samples, seqlen,
                          model.hparams().n_embd);
    if (!x_fp.empty() && x_fp.size() != x.size())
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "calibration: the full-precision stream has {} values, the quantized one {}", x_fp.size(),
                          x.size());
    return std::unique_ptr<calibration_runner>(
        new cpu_calibration(model, ctx, n_samples, seqlen, std::move(x), std::move(x_fp)));
}

}  // namespace gptq
