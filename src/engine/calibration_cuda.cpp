// The CUDA calibration runner (calibration.h, --device cuda, experimental): the calibration
// windows' hidden states on the GPU in F16, the layer passes of model/llama_cuda_layer.h, Hessians
// from its hooks (cuda_hessian_accumulator), the solve (gptq_quantize_cuda) and the errors on the
// GPU. Built without CUDA, opening it returns device_check's "built without CUDA" error.
#include <fmt/format.h>

#include "calibration.h"
#include "core/error.h"
#ifdef GPTQ_HAVE_CUDA
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <map>

#include "core/dtype.h"
#include "core/log.h"
#include "host_memory.h"
#include "model/llama_cuda_layer.h"
#include "quant/gptq_cuda.h"
#endif

namespace gptq {

#ifdef GPTQ_HAVE_CUDA

namespace {

class cuda_calibration final : public calibration_runner {
public:
    status layer_begin(const llama_layer& layer) override { return runner_->load(layer); }
    status layer_begin_f16(const llama_layer& layer, const std::vector<std::vector<uint16_t>>& w16) override {
        return runner_->load(layer, &w16);
    }

    status hessians_collect(const llama_layer&, const std::vector<linear_role>& group) override {
        const llama_hparams& hp = *hp_;
        acc_.clear();
        drop_h();
        linear_input last = linear_input::LINEAR_INPUT_QKV;
        for (linear_role r : group) {
            const linear_input in = linear_role_input(r);
            if (!acc_.count(in)) {
                GPTQ_ASSIGN_OR_RETURN(auto a, cuda_hessian_accumulator::create(*gpu_, hp.linear_shape(r)[1]));
                acc_.emplace(in, std::move(a));
            }
            last = std::max(last, in);
        }
        cuda_linear_input_hook hook = [&](linear_input which, const uint16_t* x, int64_t n_tokens, int64_t) -> status {
            auto it = acc_.find(which);
            if (it == acc_.end()) return status::ok();
            GPTQ_TRY(timer_start());
            GPTQ_TRY(it->second.add_f16(*gpu_, x, n_tokens));
            return timer_stop();
        };
        GPTQ_TRY(runner_->forward(x_dev_.as<uint16_t>(), n_samples_, &hook, last));
        return timer_collect();  // waits for the passes (the caller's phase timer would)
    }

    // H on the device (kept for weighted_error) and a host copy (the solve's input).
    result<std::vector<float>> hessian(linear_input in) override {
        auto it = acc_.find(in);
        if (it == acc_.end())
            return make_error(status_code::STATUS_INTERNAL, "calibration: no Hessian collected for the {} input",
                              linear_input_name(in));
        const int64_t n_in = it->second.n_in();
        drop_h();
        GPTQ_ASSIGN_OR_RETURN(h_dev_, cuda_buffer::alloc(size_t(n_in * n_in) * 4));
        GPTQ_TRY(it->second.finish(*gpu_, h_dev_.as<float>()));
        std::vector<float> h(size_t(n_in * n_in));
        GPTQ_TRY(cuda_copy_to_host(*gpu_, h.data(), h_dev_.data(), h.size() * 4));
        return h;
    }

    result<quantized_linear> solve(const float* w, int64_t n_out, int64_t n_in, const std::vector<float>& h,
                                   const gptq_options& opt, gptq_stats* stats) override {
        return gptq_quantize_cuda(*gpu_, ctx_, w, n_out, n_in, h.data(), opt, stats);
    }

    // O(n_out n_in^2): on the GPU, with the device copy of H.
    result<double> weighted_error(const float* w, const float* wq, int64_t n_out, int64_t n_in,
                                  const std::vector<float>& h) override {
        if (h_dev_.bytes() != h.size() * 4 || int64_t(h.size()) != n_in * n_in)
            return make_error(status_code::STATUS_INTERNAL, "calibration: weighted error without its Hessian");
        return hessian_weighted_error_cuda(*gpu_, ctx_, w, wq, n_out, n_in, h_dev_.as<float>());
    }

    status linear_update(linear_role r, const std::vector<float>& w) override { return runner_->linear_update(r, w); }

    // ---- device-resident linears (GPTQ_QUANTIZE_PLAIN=1 turns them off: resident() false) ----
    bool resident() const override { return resident_; }

    status hessian_keep(linear_input in) override {
        if (h_in_ == in && h_dev_.bytes()) return status::ok();  // q/k/v, gate/up: one H per input
        auto it = acc_.find(in);
        if (it == acc_.end())
            return make_error(status_code::STATUS_INTERNAL, "calibration: no Hessian collected for the {} input",
                              linear_input_name(in));
        const int64_t n_in = it->second.n_in();
        drop_h();
        GPTQ_ASSIGN_OR_RETURN(h_dev_, cuda_buffer::alloc(size_t(n_in * n_in) * 4));
        GPTQ_TRY(it->second.finish(*gpu_, h_dev_.as<float>()));
        h_in_ = in;
        return status::ok();
    }

    // W from the runner's F16 copy when that is exact (an F16 checkpoint: no upload), else uploaded.
    result<quantized_linear> solve_kept(linear_role r, const float* w, int64_t n_out, int64_t n_in,
                                        const gptq_options& opt, gptq_stats* stats) override {
        if (h_in_ == linear_input::LINEAR_INPUT_COUNT || h_dev_.bytes() != size_t(n_in * n_in) * 4)
            return make_error(status_code::STATUS_INTERNAL,
                              "calibration: solve of a {} x {} linear without its Hessian", n_out, n_in);
        w_kept_ = cuda_buffer();
        q_kept_ = gptq_cuda_codes();
        if (!solver_) {  // kept across linears
            GPTQ_ASSIGN_OR_RETURN(solver_, cuda_gptq_solver::create(*gpu_));
        }
        return gptq_quantize_cuda_resident(*gpu_, ctx_, w, n_out, n_in, h_dev_.as<float>(), opt, stats, &w_kept_,
                                           &q_kept_, runner_->linear_f16_if_exact(r), solver_.get());
    }

    result<double> weighted_error_kept(const quantized_linear* q) override {
        if (!w_kept_.bytes() || h_dev_.bytes() != size_t(q_kept_.n_in * q_kept_.n_in) * 4)
            return make_error(status_code::STATUS_INTERNAL, "calibration: weighted error without a kept solve");
        if (!q) return hessian_weighted_error_cuda(*gpu_, w_kept_.as<float>(), q_kept_, h_dev_.as<float>());
        if (q->n_out != q_kept_.n_out || q->n_in != q_kept_.n_in)
            return make_error(status_code::STATUS_INTERNAL, "calibration: weighted error of {} x {} against {} x {}",
                              q->n_out, q->n_in, q_kept_.n_out, q_kept_.n_in);
        GPTQ_ASSIGN_OR_RETURN(const gptq_cuda_codes c, gptq_cuda_codes_upload(*gpu_, *q));
        return hessian_weighted_error_cuda(*gpu_, w_kept_.as<float>(), c, h_dev_.as<float>());
    }

    status linear_update_kept(linear_role r) override {
        if (!q_kept_.code.bytes())
            return make_error(status_code::STATUS_INTERNAL, "calibration: update of {} without a kept solve",
                              linear_role_name(r));
        GPTQ_TRY(runner_->linear_update(r, q_kept_.view()));
        w_kept_ = cuda_buffer();  // the linear is done (the update is queued on the same stream)
        q_kept_ = gptq_cuda_codes();
        return status::ok();
    }

    status layer_forward(const llama_layer& layer) override {
        acc_.clear();
        moe_acc_.clear();
        drop_h();
        if (layer.moe) GPTQ_TRY(runner_->moe_load(layer));  // the experts as quantized (host layer only)
        return runner_->forward(x_dev_.as<uint16_t>(), n_samples_, nullptr);
    }

    // As the CPU runner (calibration.cpp): accumulators [0] the shared expert (GATE_UP: the block
    // input over every token, which route-all experts share), [e + 1] expert e, fed by the layer's
    // hooks per expert over the tokens routed to it (DOWN of a route-all expert: every token).
    status moe_hessians_collect(const llama_layer& layer, linear_input in,
                                const std::vector<bool>& route_all) override {
        const llama_hparams& hp = *hp_;
        if (!layer.moe || (in != linear_input::LINEAR_INPUT_GATE_UP && in != linear_input::LINEAR_INPUT_DOWN))
            return make_error(status_code::STATUS_INTERNAL, "calibration: layer {} has no MoE block or input {}",
                              layer.index, linear_input_name(in));
        const bool gate_up = in == linear_input::LINEAR_INPUT_GATE_UP;
        // The experts as the caller's layer holds them now: its MoE pass updates the host layer's
        // gate/up before asking for the down inputs (layer_begin loaded them for GATE_UP).
        if (!gate_up) GPTQ_TRY(runner_->moe_load(layer));
        acc_.clear();
        drop_h();
        moe_acc_.clear();  // the other input's are not asked for again (quantize_moe: gate/up, then down)
        auto&         acc         = moe_acc_[in];
        const int64_t n_in_shared = gate_up ? hp.n_embd : std::max<int64_t>(hp.n_ff_shared, 1);
        GPTQ_ASSIGN_OR_RETURN(auto a0, cuda_hessian_accumulator::create(*gpu_, n_in_shared));
        acc.push_back(std::move(a0));
        for (int64_t e = 0; e < hp.n_expert; ++e) {
            GPTQ_ASSIGN_OR_RETURN(auto a,
                                  cuda_hessian_accumulator::create(*gpu_, gate_up ? hp.n_embd : hp.n_ff_expert));
            acc.push_back(std::move(a));
        }
        if (gate_up) counts_.assign(size_t(hp.n_expert), 0);
        cuda_linear_input_hook hook = [&](linear_input which, const uint16_t* x, int64_t n_tokens, int64_t) -> status {
            return gate_up && which == linear_input::LINEAR_INPUT_GATE_UP ? acc[0].add_f16(*gpu_, x, n_tokens)
                                                                          : status::ok();
        };
        cuda_moe_input_hook mhook = [&](int64_t e, linear_input which, const uint16_t* x, int64_t n_tokens,
                                        int64_t) -> status {
            if (which != in) return status::ok();
            if (e == k_moe_shared) return gate_up ? status::ok() : acc[0].add_f16(*gpu_, x, n_tokens);
            if (e < 0 || e >= hp.n_expert) return make_error(status_code::STATUS_INTERNAL, "calibration: expert {}", e);
            if (gate_up) counts_[size_t(e)] += n_tokens;
            return acc[size_t(e + 1)].add_f16(*gpu_, x, n_tokens);
        };
        return runner_->forward(x_dev_.as<uint16_t>(), n_samples_, &hook, in, &mhook, gate_up ? nullptr : &route_all);
    }

    // H of expert `expert`'s `in` on the device (kept for weighted_error) and a host copy, as hessian().
    result<std::vector<float>> moe_hessian(linear_input in, int64_t expert, bool all_tokens) override {
        auto it = moe_acc_.find(in);
        if (it == moe_acc_.end() || it->second.empty())
            return make_error(status_code::STATUS_INTERNAL, "calibration: no MoE Hessians collected for the {} input",
                              linear_input_name(in));
        const bool   shared_slot = expert == k_moe_shared || (all_tokens && in == linear_input::LINEAR_INPUT_GATE_UP);
        const size_t k           = shared_slot ? 0 : size_t(expert + 1);
        if (k >= it->second.size())
            return make_error(status_code::STATUS_INTERNAL, "calibration: expert {} out of range", expert);
        const cuda_hessian_accumulator& a    = it->second[k];
        const int64_t                   n_in = a.n_in();
        drop_h();
        GPTQ_ASSIGN_OR_RETURN(h_dev_, cuda_buffer::alloc(size_t(n_in * n_in) * 4));
        GPTQ_TRY(a.finish(*gpu_, h_dev_.as<float>()));
        std::vector<float> h(size_t(n_in * n_in));
        GPTQ_TRY(cuda_copy_to_host(*gpu_, h.data(), h_dev_.data(), h.size() * 4));
        return h;
    }

    std::vector<int64_t> moe_token_counts() const override { return counts_; }

    // The windows go to the host one at a time (F16 -> F32), get the final norm there (the model's
    // own op), and come back as F16 into a device accumulator: H and its device copy as hessian().
    result<std::vector<float>> final_norm_hessian() override {
        const int64_t n_embd = hp_->n_embd, n = seqlen_ * n_embd;
        acc_.clear();
        drop_h();
        GPTQ_ASSIGN_OR_RETURN(cuda_hessian_accumulator acc, cuda_hessian_accumulator::create(*gpu_, n_embd));
        GPTQ_ASSIGN_OR_RETURN(cuda_buffer y_dev, cuda_buffer::alloc(size_t(n) * 2));
        std::vector<uint16_t> x16(static_cast<size_t>(n)), y16(static_cast<size_t>(n));
        std::vector<float>    x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
        for (int64_t j = 0; j < n_samples_; ++j) {
            // Waits for the stream: the previous window's upload from y16 and its add are done.
            GPTQ_TRY(cuda_copy_to_host(*gpu_, x16.data(), x_dev_.as<uint16_t>() + j * n, size_t(n) * 2));
            for (size_t k = 0; k < x.size(); ++k) x[k] = f16_to_f32(x16[k]);
            model_->final_norm(ctx_, x.data(), seqlen_, y.data());
            for (size_t k = 0; k < y.size(); ++k) y16[k] = f32_to_f16(y[k]);
            GPTQ_TRY(cuda_copy_to_device_async(*gpu_, y_dev.data(), y16.data(), size_t(n) * 2));
            GPTQ_TRY(acc.add_f16(*gpu_, y_dev.as<uint16_t>(), seqlen_));
        }
        GPTQ_ASSIGN_OR_RETURN(h_dev_, cuda_buffer::alloc(size_t(n_embd * n_embd) * 4));
        GPTQ_TRY(acc.finish(*gpu_, h_dev_.as<float>()));
        std::vector<float> h(size_t(n_embd * n_embd));
        GPTQ_TRY(cuda_copy_to_host(*gpu_, h.data(), h_dev_.data(), h.size() * 4));
        return h;
    }

    // Also samples the device's memory in use (the report's device_used_peak_bytes).
    status synchronize() override {
        GPTQ_TRY(gpu_->synchronize());
        GPTQ_ASSIGN_OR_RETURN(const cuda_memory_info mem, cuda_memory_info_get(*gpu_));
        used_peak_ = std::max<uint64_t>(used_peak_, mem.total - mem.free);
        return status::ok();
    }
    uint64_t                                    device_plan_bytes() const override { return plan_bytes_; }
    uint64_t                                    device_used_peak() const override { return used_peak_; }
    std::vector<std::pair<std::string, double>> detail_seconds() const override {
        return {{"calibration.hessian_gpu", hessian_gpu_seconds_}};
    }

    static result<std::unique_ptr<calibration_runner>> open(const device_spec& dev, const llama_model& model,
                                                            const ops_context& ctx, thread_pool* pool,
                                                            int64_t n_samples, int64_t seqlen, std::vector<float> x);

private:
    cuda_calibration() = default;
    status plan_check(const device_spec& dev);
    void   drop_h() {
          h_dev_ = cuda_buffer();
          h_in_  = linear_input::LINEAR_INPUT_COUNT;
    }
    // Timing events around the Hessian accumulations of a collect (reused; summed by collect).
    status timer_start() {
        if (timer_used_ == timer_events_.size()) {
            GPTQ_ASSIGN_OR_RETURN(cuda_event a, cuda_event::create_timing());
            GPTQ_ASSIGN_OR_RETURN(cuda_event b, cuda_event::create_timing());
            timer_events_.emplace_back(std::move(a), std::move(b));
        }
        return timer_events_[timer_used_].first.record(gpu_->stream());
    }
    status timer_stop() { return timer_events_[timer_used_++].second.record(gpu_->stream()); }
    status timer_collect() {
        for (size_t k = 0; k < timer_used_; ++k) {
            GPTQ_ASSIGN_OR_RETURN(const double s,
                                  cuda_event::elapsed_seconds(timer_events_[k].first, timer_events_[k].second));
            hessian_gpu_seconds_ += s;
        }
        timer_used_ = 0;
        return status::ok();
    }

    const llama_hparams*                             hp_    = nullptr;
    const llama_model*                               model_ = nullptr;
    ops_context                                      ctx_;
    int64_t                                          n_samples_ = 0, seqlen_ = 0;
    uint64_t                                         plan_bytes_ = 0;
    uint64_t                                         used_peak_  = 0;  // synchronize()'s samples
    std::vector<std::pair<cuda_event, cuda_event>>   timer_events_;
    size_t                                           timer_used_          = 0;
    double                                           hessian_gpu_seconds_ = 0.0;
    std::unique_ptr<cuda_context>                    gpu_;
    std::unique_ptr<llama_cuda_layer_runner>         runner_;
    std::unique_ptr<cuda_gptq_solver>                solver_;  // solve_kept's cuSOLVER handle + workspace
    cuda_buffer                                      x_dev_;   // [n_samples * seqlen, n_embd] F16
    std::map<linear_input, cuda_hessian_accumulator> acc_;
    cuda_buffer                                      h_dev_;       // the last hessian(): [n_in, n_in] F32
    linear_input    h_in_     = linear_input::LINEAR_INPUT_COUNT;  // the input h_dev_ holds (hessian_keep)
    bool            resident_ = true;                              // not GPTQ_QUANTIZE_PLAIN
    cuda_buffer     w_kept_;                                       // the last solve_kept's W [n_out, n_in] F32
    gptq_cuda_codes q_kept_;                                       // and its codes
    std::map<linear_input, std::vector<cuda_hessian_accumulator>> moe_acc_;  // [shared, experts...]
    std::vector<int64_t>                                          counts_;   // tokens per expert
};

// Print the device memory plan and refuse it when the GPU has less free memory.
status cuda_calibration::plan_check(const device_spec& dev) {
    const llama_hparams& hp      = *hp_;
    const int64_t        n_tok   = n_samples_ * seqlen_;
    const uint64_t       x_bytes = uint64_t(n_tok) * uint64_t(hp.n_embd) * 2;
    uint64_t             w_bytes = 0, h_bytes = 0, solve_bytes = 0;
    for (int r = 0; r < k_n_linear_roles; ++r) {
        const auto     shp = hp.linear_shape(static_cast<linear_role>(r));
        const uint64_t wn = uint64_t(shp[0] * shp[1]), hn = uint64_t(shp[1] * shp[1]);
        w_bytes += wn * 2;
        // The solve: W (raw, permuted), H (raw, permuted / U), codes, the error's D and D H.
        solve_bytes = std::max<uint64_t>(solve_bytes, wn * 4 * 4 + hn * 4 * 2 + wn);
        h_bytes += hn * 4;  // one accumulator per input (all four without --true-sequential)
    }
    // The runner's activations for one chunk: the sizes llama_cuda_layer_runner::create allocates.
    const int64_t  chunk = std::max<int64_t>(1, 16384 / seqlen_) * seqlen_;
    const uint64_t act_bytes =
        uint64_t(std::min(chunk, n_tok)) *
        uint64_t(2 * hp.n_embd + std::max(hp.n_embd, hp.q_dim()) + hp.q_dim() + 2 * hp.kv_dim() + 2 * hp.n_ff) * 2;
    // The attention output of every window, kept between GPTQ's passes over the layer (q/k/v are
    // quantized first, so the later passes and the final one reuse it).
    const uint64_t attn_bytes = uint64_t(n_tok) * uint64_t(hp.q_dim()) * 2;
    // A MoE layer (llama_cuda_moe.h): every expert (and the shared one) in F16, one Hessian per
    // expert of the larger input, a chunk's gathered rows and expert activations (k per token).
    uint64_t moe_bytes = 0;
    if (hp.n_expert > 0) {
        const uint64_t ff = uint64_t(hp.n_ff_expert), fs = uint64_t(hp.n_ff_shared), E = uint64_t(hp.n_expert);
        const uint64_t d = uint64_t(hp.n_embd), k = uint64_t(hp.n_expert_used);
        const uint64_t t = uint64_t(std::min(chunk, n_tok));
        moe_bytes        = (E * 3 * d * ff + 3 * d * fs + E * d + d) * 2 + (E + 1) * d * d * 4 +
                    t * (k * (2 * d + 2 * ff) * 2 + k * 16 + E * 4 + (2 * fs + d) * 2 + 2 * ff * 2);
        solve_bytes =
            std::max<uint64_t>(solve_bytes, d * ff * 4 * 4 + std::max(d, ff) * std::max(d, ff) * 4 * 2 + d * ff);
    }
    const uint64_t plan = x_bytes + w_bytes + act_bytes + h_bytes + solve_bytes + attn_bytes + moe_bytes;
    GPTQ_ASSIGN_OR_RETURN(const cuda_memory_info mem, cuda_memory_info_get(*gpu_));
    GPTQ_LOG_INFO(
        "GPU memory plan: calibration inputs {} (F16) + one layer {} + activations {} + attention cache {} + "
        "Hessians {} + solve {}{} = {} (cuda:{} has {} free of {})",
        human_bytes(x_bytes), human_bytes(w_bytes), human_bytes(act_bytes), human_bytes(attn_bytes),
        human_bytes(h_bytes), human_bytes(solve_bytes),
        moe_bytes ? " + MoE experts, their Hessians and activations " + human_bytes(moe_bytes) : std::string(),
        human_bytes(plan), gpu_->device(), human_bytes(mem.free), human_bytes(mem.total));
    if (plan > mem.free)
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "quantizing on {} needs about {} of GPU memory and {} is free; lower --nsamples or "
                          "--seqlen, or use --device cpu",
                          device_name(dev), human_bytes(plan), human_bytes(mem.free));
    plan_bytes_ = plan;
    return status::ok();
}

result<std::unique_ptr<calibration_runner>> cuda_calibration::open(const device_spec& dev, const llama_model& model,
                                                                   const ops_context& ctx, thread_pool* pool,
                                                                   int64_t n_samples, int64_t seqlen,
                                                                   std::vector<float> x) {
    GPTQ_TRY(device_check(dev));
    const llama_hparams& hp = model.hparams();
    if (n_samples <= 0 || seqlen <= 0 || static_cast<int64_t>(x.size()) != n_samples * seqlen * hp.n_embd)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "calibration: {} values for {} windows of {} tokens of width {}", x.size(), n_samples, seqlen,
                          hp.n_embd);
    std::unique_ptr<cuda_calibration> c(new cuda_calibration());
    c->hp_        = &hp;
    c->model_     = &model;
    c->ctx_       = ctx;
    c->n_samples_ = n_samples;
    c->seqlen_    = seqlen;
    c->resident_  = !quantize_plain_mode();
    GPTQ_ASSIGN_OR_RETURN(c->gpu_, cuda_context::create(dev.index));
    GPTQ_LOG_WARN(
        "--device {}: GPTQ on the GPU is experimental (calibration passes in F16 with F32 accumulation, "
        "Hessians, Cholesky and column loop in F32 there); compare with --device cpu before trusting it",
        device_name(dev));
    GPTQ_TRY(c->plan_check(dev));
#ifdef __GLIBC__
    // The host side allocates and frees layer-sized arrays (hundreds of MB) for every linear; glibc
    // maps each from the kernel afresh (page faults on first touch, slow in sandboxes). Keep them in
    // the heap and reuse the pages instead (the host memory plan bounds what is live).
    // (M_MMAP_THRESHOLD is capped at 32 MiB, so mmap is switched off instead.)
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
    // F32 -> F16 on the pool's threads (GBs at the 7B shape); the first value out of range is named.
    std::vector<uint16_t> x16(x.size());
    const int64_t         n_x = static_cast<int64_t>(x.size());
    std::atomic<int64_t>  bad{n_x};
    auto                  convert = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            if (!(std::fabs(x[size_t(i)]) <= 65504.0f)) {
                int64_t cur = bad.load();
                while (i < cur && !bad.compare_exchange_weak(cur, i)) {
                }
                return;
            }
            x16[size_t(i)] = f32_to_f16(x[size_t(i)]);
        }
    };
    if (pool && n_x >= (int64_t(1) << 20) && !quantize_plain_mode())
        pool->parallel_for(n_x, convert);
    else
        convert(0, n_x);
    if (bad.load() < n_x) {
        const size_t i = size_t(bad.load());
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "model.embed_tokens.weight holds {} (calibration row {}), outside the F16 range the "
                          "GPU calibration uses; use --device cpu",
                          x[i], i / size_t(hp.n_embd));
    }
    GPTQ_ASSIGN_OR_RETURN(c->x_dev_, cuda_buffer::from_host(x16.data(), x16.size() * 2));
    std::vector<float>().swap(x);
    GPTQ_ASSIGN_OR_RETURN(c->runner_, llama_cuda_layer_runner::create(*c->gpu_, hp, seqlen));
    GPTQ_TRY(c->runner_->attention_cache_enable(n_samples));
    c->runner_->set_thread_pool(pool);
    return std::unique_ptr<calibration_runner>(std::move(c));
}

}  // namespace

result<std::unique_ptr<calibration_runner>> calibration_runner_cuda(const device_spec& dev, const llama_model& model,
                                                                    const ops_context& ctx, thread_pool* pool,
                                                                    int64_t n_samples, int64_t seqlen,
                                                                    std::vector<float> x) {
    return cuda_calibration::open(dev, model, ctx, pool, n_samples, seqlen, std::move(x));
}

#else

result<std::unique_ptr<calibration_runner>> calibration_runner_cuda(const device_spec& dev, const llama_model&,
                                                                    const ops_context&, thread_pool*, int64_t, int64_t,
                                                                    std::vector<float>) {
    GPTQ_TRY(device_check(dev));  // the "built without CUDA" error
    return make_error(status_code::STATUS_UNSUPPORTED, "--device {}: this build has no CUDA calibration runner",
                      device_name(dev));
}

#endif

}  // namespace gptq
