// The CUDA model_session (model_session.h) over llama_cuda_model's public API (model/llama_cuda.h),
// which keeps ONE position for all its sequences: the shapes it runs (docs/engine.md) are
//   - one sequence, slot 0: prefill (any token count, all_logits or not) or a decode token (the
//     CUDA-graph step), at any position;
//   - lockstep: slots 0 .. k-1 (1 < k <= 16) all at the same position with the same token count:
//     one token each (decode_batch, one launch of every kernel for all k) or a prompt each
//     (prefill_batch, last-token logits only).
// Every listed slot must be at the GPU's current position; once all slots are reset it starts
// again from 0. Any other step is a STATUS_UNSUPPORTED error naming its shape. Builds without CUDA
// too: opening then returns device_check's error. Memory is the device bytes the model allocated
// (weights, KV caches, activations, staging), not a driver-level peak.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "model_session.h"
#ifdef GPTQ_HAVE_CUDA
#include "gptq/plan.h"
#include "lora_load.h"
#include "model/llama_cuda.h"
#endif

namespace gptq {

#ifdef GPTQ_HAVE_CUDA

namespace {

constexpr status_code E_ARG          = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_UNSUP        = status_code::STATUS_UNSUPPORTED;
constexpr int64_t     k_max_lockstep = 16;  // llama_cuda_model::sequences_reserve

class model_session_cuda final : public model_session {
public:
    std::unique_ptr<llama_cuda_model> gpu_;
    device_spec                       dev_;

    const llama_hparams& hparams() const override { return gpu_->hparams(); }
    const llama_model&   model() const override { return gpu_->host(); }
    std::string          device() const override { return device_name(dev_); }
    std::string          describe() const override;
    int                  n_threads() const override { return 0; }
    bool                 ragged() const override { return false; }

    status  reserve(int64_t n_seq, int64_t n_ctx) override;
    int64_t n_seq() const override { return static_cast<int64_t>(pos_.size()); }
    int64_t n_ctx() const override { return n_ctx_; }
    void    seq_reset(int64_t seq) override;
    int64_t seq_pos(int64_t seq) const override {
        return seq >= 0 && seq < n_seq() ? pos_[static_cast<size_t>(seq)] : -1;
    }

    status step(std::span<const seq_step> steps, float* logits) override;
    status evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora) override;

    uint64_t memory_used() const override {
        const auto& m = *gpu_;
        return m.weight_bytes() + m.cache_bytes() + m.activation_bytes() + m.staging_bytes();
    }
    void        memory_reset_peak() override {}
    std::string memory_kind() const override { return "device_allocated"; }
    uint64_t    kv_bytes_per_position() const override {  // F16 K and V (docs/cuda.md "KV cache")
        return 2ull * static_cast<uint64_t>(hparams().n_layer * hparams().kv_dim()) * sizeof(uint16_t);
    }
    uint64_t offload_bytes() const override { return gpu_->offload_bytes(); }

    status profile_ops(bool on) override {
        gpu_->set_profile_ops(on);
        if (on) gpu_->profile_reset();
        return status::ok();
    }
    gpu_op_profile decode_profile() const override;
    void           lora_name_add(const std::string& name) { lora_names_.push_back(name); }

private:
    status lockstep_check(std::span<const seq_step> steps) const;

    std::vector<int64_t> pos_;  // per slot: positions cached (the GPU's n_past for the slots in step)
    int64_t              n_ctx_ = 0;
    std::vector<int32_t> ids_;     // a step's tokens in slot order, [k, n]
    std::vector<float>   logits_;  // a step's logits in slot order when the steps list them otherwise
};

std::string model_session_cuda::describe() const {
    const auto& m = *gpu_;
    std::string s = fmt::format(
        "{}: weights {:.1f} MiB (GPTQ linears: {} int4 kernel, {} generic), KV cache {:.1f} MiB", device_name(dev_),
        m.weight_bytes() / 1048576.0, m.n_gptq_fast(), m.n_gptq_generic(), m.cache_bytes() / 1048576.0);
    if (m.n_offloaded() > 0)
        s += fmt::format(", {} modules offloaded: {:.1f} MiB in pinned host memory, staging {:.1f} MiB",
                         m.n_offloaded(), m.offload_bytes() / 1048576.0, m.staging_bytes() / 1048576.0);
    return s;
}

gpu_op_profile model_session_cuda::decode_profile() const {
    const llama_op_profile& p = gpu_->decode_profile();
    gpu_op_profile          g;
    g.passes  = p.passes;
    g.tokens  = p.tokens;
    g.pass_ms = p.pass_ms;
    for (const auto& o : p.ops) g.ops.push_back({o.op, o.calls, o.ms});
    return g;
}

// The GPU's caches only grow (sequences_reserve, context_reserve); n_seq 0 keeps them.
status model_session_cuda::reserve(int64_t n_seq, int64_t n_ctx) {
    if (n_seq < 0 || n_seq > k_max_lockstep || (n_seq > 0 && n_ctx < 1))
        return make_error(E_ARG,
                          "reserve: {} sequences of {} positions; the GPU model runs 0 to {} sequences of at least 1 "
                          "position",
                          n_seq, n_ctx, k_max_lockstep);
    pos_.clear();
    n_ctx_ = 0;
    gpu_->reset();
    if (n_seq == 0) return status::ok();
    GPTQ_TRY(gpu_->sequences_reserve(n_seq));
    GPTQ_TRY(gpu_->context_reserve(n_ctx));
    pos_.assign(static_cast<size_t>(n_seq), 0);
    n_ctx_ = n_ctx;
    return status::ok();
}

void model_session_cuda::seq_reset(int64_t seq) {
    if (seq < 0 || seq >= n_seq()) return;
    pos_[static_cast<size_t>(seq)] = 0;
    if (std::all_of(pos_.begin(), pos_.end(), [](int64_t p) { return p == 0; })) gpu_->reset();
}

// The shapes of the header comment; the slots are known, unrepeated and in range (steps_check).
status model_session_cuda::lockstep_check(std::span<const seq_step> steps) const {
    const int64_t   k = static_cast<int64_t>(steps.size());
    const seq_step& a = steps[0];
    const int64_t   p = seq_pos(a.seq);
    for (const seq_step& s : steps) {
        if (s.seq >= k)
            return make_error(E_UNSUP,
                              "step on {}: a batch of {} sequences runs slots 0 .. {} in lockstep, this one lists slot "
                              "{}; other subsets need a ragged backend (--device cpu)",
                              device(), k, k - 1, s.seq);
        if (s.n_tokens != a.n_tokens || seq_pos(s.seq) != p)
            return make_error(E_UNSUP,
                              "step on {}: the GPU model runs its sequences in lockstep (one position, one token "
                              "count), but slot {} has {} tokens at position {} and slot {} {} at position {}; ragged "
                              "steps need --device cpu",
                              device(), a.seq, a.n_tokens, p, s.seq, s.n_tokens, seq_pos(s.seq));
        if (k > 1 && s.n_tokens > 1 && s.all_logits)
            return make_error(E_UNSUP,
                              "step on {}: a batched prefill ({} sequences of {} tokens) gives each sequence's last "
                              "logits only; all_logits needs one sequence per step",
                              device(), k, s.n_tokens);
    }
    if (p != gpu_->n_past())
        return make_error(E_UNSUP,
                          "step on {}: slot {} is at position {} but the GPU model's sequences are at {} (one position "
                          "for all of them); reset every slot to start again from 0",
                          device(), a.seq, p, gpu_->n_past());
    return status::ok();
}

status model_session_cuda::step(std::span<const seq_step> steps, float* logits) {
    GPTQ_TRY(steps_check(steps));
    if (steps.empty()) return status::ok();
    GPTQ_TRY(lockstep_check(steps));
    const int64_t k = static_cast<int64_t>(steps.size()), n = steps[0].n_tokens, V = n_vocab();
    bool          in_order = true;
    ids_.resize(static_cast<size_t>(k * n));
    for (int64_t i = 0; i < k; ++i) {
        const seq_step& s = steps[static_cast<size_t>(i)];
        std::copy_n(s.ids, n, ids_.data() + s.seq * n);
        in_order = in_order && s.seq == i;
    }
    if (gpu_->n_loras() > 0) {  // each slot's adapter, read by the pass from the step inputs
        std::vector<int32_t> sel(static_cast<size_t>(k), -1);
        for (const seq_step& s : steps) sel[static_cast<size_t>(s.seq)] = s.lora;
        GPTQ_TRY(gpu_->lora_select(sel));
    }
    if (!in_order) logits_.resize(static_cast<size_t>(k * V));
    float* out = in_order ? logits : logits_.data();  // [k, V] in slot order (k > 1: one row per slot)
    if (k == 1 && n == 1)
        GPTQ_TRY(gpu_->decode(ids_[0], out));
    else if (k == 1)
        GPTQ_TRY(gpu_->prefill(ids_.data(), n, out, steps[0].all_logits));
    else if (n == 1)
        GPTQ_TRY(gpu_->decode_batch(ids_.data(), k, out));
    else
        GPTQ_TRY(gpu_->prefill_batch(ids_.data(), k, n, out));
    if (!in_order)
        for (int64_t i = 0; i < k; ++i)
            std::copy_n(logits_.data() + steps[static_cast<size_t>(i)].seq * V, V, logits + i * V);
    for (const seq_step& s : steps) pos_[static_cast<size_t>(s.seq)] += n;
    return status::ok();
}

status model_session_cuda::evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora) {
    if (n < 1) return make_error(E_ARG, "evaluate: {} tokens, expected at least 1", n);
    for (int64_t s = 0; s < n_seq(); ++s)
        if (pos_[static_cast<size_t>(s)] > 0)
            return make_error(E_UNSUP,
                              "evaluate on {} runs in sequence 0's KV cache, but slot {} holds {} positions; reset "
                              "every slot first",
                              device(), s, pos_[static_cast<size_t>(s)]);
    GPTQ_TRY(ids_check(ids, n, "evaluate"));
    GPTQ_TRY(lora_check(lora, "evaluate"));
    if (gpu_->n_loras() > 0) GPTQ_TRY(gpu_->lora_select({lora}));
    GPTQ_TRY(gpu_->context_reserve(n));  // grows only
    gpu_->reset();
    const status st = gpu_->prefill(ids, n, logits, /*all_logits=*/true);
    gpu_->reset();
    return st;
}

// --device-map / --max-memory: the planner's placement for the context of the options (printed
// to stderr), as llama_cuda_options::offload.
status placement_plan(const model_session_options& o, llama_cuda_options* out) {
    if (o.device_map.empty() && o.max_memory.empty()) return status::ok();
    plan_params pp;
    pp.model_path = o.model_path;
    pp.device_map = o.device_map.empty() ? "auto" : o.device_map;
    pp.max_memory = o.max_memory;
    pp.n_ctx      = o.n_ctx_hint;
    GPTQ_ASSIGN_OR_RETURN(device_offload_plan plan, plan_for_device(pp, o.device.index));
    if (!plan.note.empty()) std::fprintf(stderr, "%s\n", plan.note.c_str());
    std::fputs(plan.table.c_str(), stderr);
    out->offload.layers  = plan.offload_layers;
    out->offload.embed   = plan.offload_embed;
    out->offload.norm    = plan.offload_norm;
    out->offload.lm_head = plan.offload_lm_head;
    return status::ok();
}

}  // namespace

result<std::unique_ptr<model_session>> model_session_open_cuda(const model_session_options& o) {
    GPTQ_TRY(device_check(o.device));
    // llama_cuda_model::open checks the tensor table but has no strict mode: the host model's
    // check first (config and table only, no weight read).
    if (o.strict) GPTQ_TRY(llama_model::open(o.model_path, {.strict = true}).to_status());
    llama_cuda_options co;
    co.device = o.device.index;
    co.n_ctx  = o.n_ctx_hint;
    GPTQ_TRY(placement_plan(o, &co));
    auto s  = std::make_unique<model_session_cuda>();
    s->dev_ = o.device;
    if (!o.loras.empty()) {  // read for the model's hparams (config and tensor table only, no weights)
        GPTQ_ASSIGN_OR_RETURN(auto host, llama_model::open(o.model_path));
        GPTQ_ASSIGN_OR_RETURN(co.loras, lora_adapters_open(o.loras, host->hparams(), o.lora_stack));
        for (const auto& a : co.loras) s->lora_name_add(a->name);
    }
    GPTQ_ASSIGN_OR_RETURN(s->gpu_, llama_cuda_model::open(o.model_path, co));
    return std::unique_ptr<model_session>(std::move(s));
}

#else  // no CUDA in this build: device_check says so

result<std::unique_ptr<model_session>> model_session_open_cuda(const model_session_options& o) {
    GPTQ_TRY(device_check(o.device));
    return make_error(status_code::STATUS_UNSUPPORTED, "--device {}: no CUDA in this build", device_name(o.device));
}

#endif

}  // namespace gptq
