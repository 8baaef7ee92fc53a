// The CPU calibration runner (calibration.h): llama_model::layer_forward window by window in F32,
// the Hessians through its hooks, gptq_quantize and hessian_weighted_error. The oracle the GPU
// runner is compared with.
#include "calibration.h"

#include <algorithm>
#include <map>

#include "core/error.h"

namespace gptq {

namespace {

class cpu_calibration final : public calibration_runner {
public:
    cpu_calibration(const llama_model& model, const ops_context& ctx, int64_t n_samples, int64_t seqlen,
                    std::vector<float> x)
        : model_(model), ctx_(ctx), n_samples_(n_samples), seqlen_(seqlen), x_(std::move(x)) {}

    status layer_begin(const llama_layer&) override { return status::ok(); }  // layer_forward reads the layer

    status hessians_collect(const llama_layer& layer, const std::vector<linear_role>& group) override {
        const llama_hparams& hp = model_.hparams();
        acc_.clear();
        linear_input last = linear_input::LINEAR_INPUT_QKV;  // the pass can stop once this is seen
        for (linear_role r : group) {
            const linear_input in = linear_role_input(r);
            if (!acc_.count(in)) acc_[in] = std::make_unique<hessian_accumulator>(hp.linear_shape(r)[1]);
            last = std::max(last, in);
        }
        linear_input_hook hook = [&](int64_t, linear_input which, const float* x, int64_t n_tokens, int64_t) {
            auto it = acc_.find(which);
            if (it != acc_.end()) it->second->add(ctx_, x, n_tokens);
        };
        // Each window on a scratch copy: the hidden states stay the layer's inputs.
        const int64_t      n_embd = hp.n_embd;
        std::vector<float> scratch;
        for (int64_t j = 0; j < n_samples_; ++j) {
            const float* xj = x_.data() + j * seqlen_ * n_embd;
            scratch.assign(xj, xj + seqlen_ * n_embd);
            model_.layer_forward(ctx_, layer, scratch.data(), seqlen_, 0, nullptr, &hook, last);
        }
        return status::ok();
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

    status layer_forward(const llama_layer& layer) override {
        const int64_t n_embd = model_.hparams().n_embd;
        for (int64_t j = 0; j < n_samples_; ++j)
            model_.layer_forward(ctx_, layer, x_.data() + j * seqlen_ * n_embd, seqlen_, 0, nullptr);
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
    const llama_model&                                           model_;
    ops_context                                                  ctx_;
    int64_t                                                      n_samples_ = 0, seqlen_ = 0;
    std::vector<float>                                           x_;  // [n_samples * seqlen, n_embd]
    std::map<linear_input, std::unique_ptr<hessian_accumulator>> acc_;
};

}  // namespace

result<std::unique_ptr<calibration_runner>> calibration_runner_cpu(const llama_model& model, const ops_context& ctx,
                                                                   int64_t n_samples, int64_t seqlen,
                                                                   std::vector<float> x) {
    if (n_samples <= 0 || seqlen <= 0 || static_cast<int64_t>(x.size()) != n_samples * seqlen * model.hparams().n_embd)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "calibration: {} values for {} windows of {} tokens of width {}", x.size(), n_samples, seqlen,
                          model.hparams().n_embd);
    return std::unique_ptr<calibration_runner>(new cpu_calibration(model, ctx, n_samples, seqlen, std::move(x)));
}

}  // namespace gptq
