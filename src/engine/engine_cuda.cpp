// engine_cuda.h: the GPU model behind the engine's flows; stubs that return device_check's error
// in builds without CUDA.
#include "engine_cuda.h"

#include <fmt/format.h>

#include <cstdio>
#include <optional>

#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "gptq/plan.h"
#ifdef GPTQ_HAVE_CUDA
#include "model/llama_cuda.h"
#include "model/perplexity.h"
#endif

namespace gptq {

status gpu_placement_check(const device_spec& dev, const gpu_placement_flags& flags) {
    if (!dev.cuda && flags.any())
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "--device-map and --max-memory place the model's modules for the GPU runtime; they need "
                          "--device cuda or cuda:N (got --device {})",
                          device_name(dev));
    return status::ok();
}

#ifdef GPTQ_HAVE_CUDA

struct gpu_session::impl {
    std::unique_ptr<llama_cuda_model> model;
    device_spec                       dev;
};

gpu_session::gpu_session() : impl_(std::make_unique<impl>()) {}
gpu_session::~gpu_session() = default;

result<std::unique_ptr<gpu_session>> gpu_session::open(const std::string& model_path, const device_spec& dev,
                                                       int64_t n_ctx, const gpu_placement_flags& placement) {
    GPTQ_TRY(device_check(dev));
    std::unique_ptr<gpu_session> s(new gpu_session());
    llama_cuda_options           o;
    o.device = dev.index;
    o.n_ctx  = n_ctx;
    if (placement.any()) {  // the planner's costs for this context (0: the model's default, as below)
        plan_params pp;
        pp.model_path = model_path;
        pp.device_map = placement.device_map.empty() ? "auto" : placement.device_map;
        pp.max_memory = placement.max_memory;
        pp.n_ctx      = n_ctx;
        GPTQ_ASSIGN_OR_RETURN(device_offload_plan plan, plan_for_device(pp, dev.index));
        if (!plan.note.empty()) std::fprintf(stderr, "%s\n", plan.note.c_str());
        std::fputs(plan.table.c_str(), stderr);
        o.offload.layers  = plan.offload_layers;
        o.offload.embed   = plan.offload_embed;
        o.offload.norm    = plan.offload_norm;
        o.offload.lm_head = plan.offload_lm_head;
    }
    GPTQ_ASSIGN_OR_RETURN(s->impl_->model, llama_cuda_model::open(model_path, o));
    s->impl_->dev = dev;
    return s;
}

int64_t gpu_session::n_vocab() const {
    return impl_->model->hparams().n_vocab;
}
status gpu_session::context_reserve(int64_t n_ctx) {
    return impl_->model->context_reserve(n_ctx);
}
void gpu_session::reset() {
    impl_->model->reset();
}
status gpu_session::prefill(const int32_t* ids, int64_t n, float* logits, bool all_logits) {
    return impl_->model->prefill(ids, n, logits, all_logits);
}
status gpu_session::decode(int32_t id, float* logits) {
    return impl_->model->decode(id, logits);
}
status gpu_session::sequences_reserve(int64_t n_seq) {
    return impl_->model->sequences_reserve(n_seq);
}
status gpu_session::prefill_batch(const int32_t* ids, int64_t n_seq, int64_t n, float* logits) {
    return impl_->model->prefill_batch(ids, n_seq, n, logits);
}
status gpu_session::decode_batch(const int32_t* ids, int64_t n_seq, float* logits) {
    return impl_->model->decode_batch(ids, n_seq, logits);
}
uint64_t gpu_session::device_bytes() const {
    const auto& m = *impl_->model;
    return m.weight_bytes() + m.cache_bytes() + m.activation_bytes() + m.staging_bytes();
}
uint64_t gpu_session::offload_bytes() const {
    return impl_->model->offload_bytes();
}
std::string gpu_session::describe() const {
    const auto& m = *impl_->model;
    std::string s =
        fmt::format("{}: weights {:.1f} MiB (GPTQ linears: {} int4 kernel, {} generic), KV cache {:.1f} MiB",
                    device_name(impl_->dev), m.weight_bytes() / 1048576.0, m.n_gptq_fast(), m.n_gptq_generic(),
                    m.cache_bytes() / 1048576.0);
    if (m.n_offloaded() > 0)
        s += fmt::format(", {} modules offloaded: {:.1f} MiB in pinned host memory, staging {:.1f} MiB",
                         m.n_offloaded(), m.offload_bytes() / 1048576.0, m.staging_bytes() / 1048576.0);
    return s;
}

namespace {
gpu_op_profile profile_of(const llama_op_profile& p) {
    gpu_op_profile g;
    g.passes  = p.passes;
    g.tokens  = p.tokens;
    g.pass_ms = p.pass_ms;
    for (const auto& o : p.ops) g.ops.push_back({o.op, o.calls, o.ms});
    return g;
}
}  // namespace

void gpu_session::set_profile_ops(bool on) {
    impl_->model->set_profile_ops(on);
    if (on) impl_->model->profile_reset();
}
gpu_op_profile gpu_session::decode_profile() const {
    return profile_of(impl_->model->decode_profile());
}
gpu_op_profile gpu_session::prefill_profile() const {
    return profile_of(impl_->model->prefill_profile());
}

result<ppl_result> ppl_evaluate_cuda(const ppl_params& params, const device_spec& dev, const std::vector<int32_t>& ids,
                                     ppl_result r, std::chrono::steady_clock::time_point t_load) {
    auto since = [](std::chrono::steady_clock::time_point t0) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    GPTQ_ASSIGN_OR_RETURN(
        auto gpu, gpu_session::open(params.model_path, dev, params.seqlen, {params.device_map, params.max_memory}));
    r.load_seconds = since(t_load);
    // The log-softmax of each window runs on the host (F32 in, F64 sums), on a few threads.
    thread_pool       pool(2);
    const ops_context ctx{&pool, false};
    int64_t           n_windows = r.n_dataset_tokens / params.seqlen;
    if (params.max_windows > 0) n_windows = std::min(n_windows, params.max_windows);
    std::optional<progress_bar> bar;
    if (params.progress) bar.emplace("ppl", n_windows, "win");
    const window_forward fwd = [&](const int32_t* win, int64_t n, float* logits) {
        gpu->reset();
        return gpu->prefill(win, n, logits, /*all_logits=*/true);
    };
    const auto t_eval = std::chrono::steady_clock::now();
    auto sums = perplexity_evaluate(fwd, gpu->n_vocab(), ctx, ids, params.seqlen, params.max_windows, [&](int64_t) {
        if (bar) bar->update(1);
    });
    if (bar) bar->finish();
    if (!sums.is_ok()) return sums.error().with_context(params.model_path);
    r.seconds           = since(t_eval);
    r.ppl               = sums->ppl();
    r.nll_mean          = sums->nll_sum / static_cast<double>(sums->n_predicted);
    r.n_windows         = sums->n_windows;
    r.seqlen            = params.seqlen;
    r.n_tokens          = r.n_windows * params.seqlen;
    r.n_predicted       = sums->n_predicted;
    r.n_threads         = 0;
    r.device            = device_name(dev);
    r.device_bytes      = gpu->device_bytes();
    r.offload_bytes     = gpu->offload_bytes();
    r.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.n_tokens) / r.seconds : 0.0;
    return r;
}

#else  // no CUDA in this build: device_check says so

struct gpu_session::impl {};
gpu_session::gpu_session()  = default;
gpu_session::~gpu_session() = default;
result<std::unique_ptr<gpu_session>> gpu_session::open(const std::string&, const device_spec& dev, int64_t,
                                                       const gpu_placement_flags&) {
    GPTQ_TRY(device_check(dev));
    return make_error(status_code::STATUS_UNSUPPORTED, "--device {}: no CUDA in this build", device_name(dev));
}
int64_t gpu_session::n_vocab() const {
    return 0;
}
status gpu_session::context_reserve(int64_t) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
void   gpu_session::reset() {}
status gpu_session::prefill(const int32_t*, int64_t, float*, bool) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
status gpu_session::decode(int32_t, float*) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
status gpu_session::sequences_reserve(int64_t) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
status gpu_session::prefill_batch(const int32_t*, int64_t, int64_t, float*) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
status gpu_session::decode_batch(const int32_t*, int64_t, float*) {
    return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA in this build");
}
uint64_t gpu_session::device_bytes() const {
    return 0;
}
uint64_t gpu_session::offload_bytes() const {
    return 0;
}
std::string gpu_session::describe() const {
    return "";
}
void           gpu_session::set_profile_ops(bool) {}
gpu_op_profile gpu_session::decode_profile() const {
    return {};
}
gpu_op_profile gpu_session::prefill_profile() const {
    return {};
}
result<ppl_result> ppl_evaluate_cuda(const ppl_params&, const device_spec& dev, const std::vector<int32_t>&, ppl_result,
                                     std::chrono::steady_clock::time_point) {
    GPTQ_TRY(device_check(dev));
    return make_error(status_code::STATUS_UNSUPPORTED, "--device {}: no CUDA in this build", device_name(dev));
}

#endif

}  // namespace gptq
