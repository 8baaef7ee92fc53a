// The CUDA model_session (model_session.h) over llama_cuda_model's public API (model/llama_cuda.h),
// whose sequence slots each keep their own page table (a shared pool of KV pages, docs/cuda.md "KV
// pages") and position: every step shape runs (ragged()):
// each sequence with several tokens through the prefill kernels on its own (its slot, its
// position), then every one-token sequence together in one ragged decode pass (one launch of each
// kernel for all of them, a CUDA graph per count; docs/cuda.md "Ragged decode"). Builds without
// CUDA too: opening then returns device_check's error. Memory is the device bytes the model
// allocated (weights, KV caches, activations, staging), not a driver-level peak.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "model_session.h"
#ifdef GPTQ_HAVE_CUDA
#include "gptq/plan.h"
#include "model/llama_cuda.h"
#endif

namespace gptq {

#ifdef GPTQ_HAVE_CUDA

namespace {

constexpr status_code E_ARG   = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_UNSUP = status_code::STATUS_UNSUPPORTED;
static_assert(k_cuda_session_max_seq == k_llama_cuda_max_seq);

// The KV pages a step takes, checked before any of it runs (the GPU model checks each of its calls;
// a step is several calls, so the whole step is checked here): "out of KV pages" naming both.
status pages_check(const llama_cuda_model& m, std::span<const seq_step> steps, const std::string& device) {
    int64_t need = 0;
    for (const seq_step& s : steps) need += m.kv_pages_needed(s.seq, m.seq_pos(s.seq) + s.n_tokens);
    if (need > m.kv_pages_free())
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of KV pages on {}: the step of {} sequences needs {} new pages of {} positions, {} of "
                          "the {} are free",
                          device, steps.size(), need, m.page_size(), m.kv_pages_free(), m.kv_pages_total());
    return status::ok();
}

class model_session_cuda final : public model_session {
public:
    std::unique_ptr<llama_cuda_model> gpu_;
    device_spec                       dev_;

    const llama_hparams& hparams() const override { return gpu_->hparams(); }
    const llama_model&   model() const override { return gpu_->host(); }
    std::string          device() const override { return device_name(dev_); }
    std::string          describe() const override;
    int                  n_threads() const override { return 0; }
    bool                 ragged() const override { return true; }

    status  reserve(int64_t n_seq, int64_t n_ctx) override { return reserve_paged(n_seq, n_ctx, 0); }
    status  reserve_paged(int64_t n_seq, int64_t n_ctx, int64_t n_pages) override;
    int64_t kv_page_size() const override { return gpu_->page_size(); }
    int64_t kv_pages_total() const override { return gpu_->kv_pages_total(); }
    int64_t kv_pages_used() const override { return gpu_->kv_pages_used(); }
    int64_t n_seq() const override { return n_seq_; }
    int64_t n_ctx() const override { return n_ctx_; }
    void    seq_reset(int64_t seq) override { gpu_->seq_reset(seq); }
    int64_t seq_pos(int64_t seq) const override { return seq >= 0 && seq < n_seq_ ? gpu_->seq_pos(seq) : -1; }

    status step(std::span<const seq_step> steps, float* logits) override;
    status evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora = -1) override;

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
    uint64_t memory_available() const override {
        auto m = cuda_memory_info_get(gpu_->context());
        return m ? uint64_t(m->free) : 0;
    }

    status profile_ops(bool on) override {
        gpu_->set_profile_ops(on);
        if (on) gpu_->profile_reset();
        return status::ok();
    }
    gpu_op_profile decode_profile() const override;

private:
    int64_t              n_seq_ = 0, n_ctx_ = 0;  // reserved (the GPU's caches may be larger)
    std::vector<int32_t> ids_;                    // a step's one-token sequences: ids, slots
    std::vector<int64_t> seqs_;
    std::vector<float>   logits_;  // their logits
};

std::string model_session_cuda::describe() const {
    const auto& m = *gpu_;
    std::string s = fmt::format(
        "{}: weights {:.1f} MiB (GPTQ linears: {} int4 kernel, {} generic), KV cache {:.1f} MiB ({} pages of {} "
        "positions)",
        device_name(dev_), m.weight_bytes() / 1048576.0, m.n_gptq_fast(), m.n_gptq_generic(),
        m.cache_bytes() / 1048576.0, m.kv_pages_total(), m.page_size());
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

// kv_reserve lays the GPU's cache out again (what changed is reallocated); n_seq 0 keeps it.
status model_session_cuda::reserve_paged(int64_t n_seq, int64_t n_ctx, int64_t n_pages) {
    if (n_seq < 0 || n_seq > k_llama_cuda_max_seq || (n_seq > 0 && n_ctx < 1) || n_pages < 0)
        return make_error(E_ARG,
                          "reserve: {} sequences of {} positions, {} KV pages; the GPU model runs 0 to {} sequences "
                          "of at least 1 position",
                          n_seq, n_ctx, n_pages, k_llama_cuda_max_seq);
    n_seq_ = n_ctx_ = 0;
    gpu_->reset();
    if (n_seq == 0) return status::ok();
    GPTQ_TRY(gpu_->kv_reserve(n_seq, n_ctx, n_pages));
    n_seq_ = n_seq;
    n_ctx_ = n_ctx;
    return status::ok();
}

// Sequences with several tokens one by one through the prefill kernels, then every one-token
// sequence in one ragged decode pass; the logits rows in the order of the steps.
status model_session_cuda::step(std::span<const seq_step> steps, float* logits) {
    GPTQ_TRY(steps_check(steps));
    const int64_t V   = n_vocab();
    int64_t       row = 0;
    GPTQ_TRY(pages_check(*gpu_, steps, device()));
    ids_.clear();
    seqs_.clear();
    std::vector<int64_t> decode_rows;
    for (const seq_step& s : steps) {
        const int64_t rows = s.all_logits ? s.n_tokens : 1;
        if (s.n_tokens == 1) {
            ids_.push_back(s.ids[0]);
            seqs_.push_back(s.seq);
            decode_rows.push_back(row);
        } else {
            GPTQ_TRY(gpu_->prefill_seq(s.seq, s.ids, s.n_tokens, logits + row * V, s.all_logits));
        }
        row += rows;
    }
    if (ids_.empty()) return status::ok();
    const int64_t k = static_cast<int64_t>(ids_.size());
    logits_.resize(static_cast<size_t>(k * V));
    GPTQ_TRY(gpu_->decode_seqs(ids_.data(), seqs_.data(), k, logits_.data()));
    for (int64_t i = 0; i < k; ++i)
        std::copy_n(logits_.data() + i * V, V, logits + decode_rows[static_cast<size_t>(i)] * V);
    return status::ok();
}

// Runs in slot 0's cache (which must be empty), which is empty again after.
status model_session_cuda::evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora) {
    if (n < 1) return make_error(E_ARG, "evaluate: {} tokens, expected at least 1", n);
    GPTQ_TRY(lora_check(lora, "evaluate"));
    if (gpu_->seq_pos(0) > 0)
        return make_error(E_UNSUP,
                          "evaluate on {} runs in sequence 0's KV cache, but slot 0 holds {} positions; reset it "
                          "first",
                          device(), gpu_->seq_pos(0));
    GPTQ_TRY(ids_check(ids, n, "evaluate"));
    if (n > gpu_->n_ctx()) {  // grows only, and drops every slot's cache
        for (int64_t s = 1; s < n_seq_; ++s)
            if (gpu_->seq_pos(s) > 0)
                return make_error(E_UNSUP,
                                  "evaluate on {}: {} tokens need a larger KV cache than the {} positions reserved, "
                                  "which would drop slot {}'s {} cached positions; reset every slot first",
                                  device(), n, gpu_->n_ctx(), s, gpu_->seq_pos(s));
        GPTQ_TRY(gpu_->context_reserve(n));
    }
    const status st = gpu_->prefill_seq(0, ids, n, logits, /*all_logits=*/true);
    gpu_->seq_reset(0);
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
    // The adapters' kernel exists (kernels/cuda/lora.cu, op_cuda_lora_add, called by the GPU layer
    // for rows with an adapter) but the runtime does not load adapters yet (docs/lora.md).
    if (!o.loras.empty())
        return make_error(E_UNSUP,
                          "--lora {} on --device {}: LoRA adapters run on the CPU only for now; use --device cpu",
                          o.loras[0].path, device_name(o.device));
    // llama_cuda_model::open checks the tensor table but has no strict mode: the host model's
    // check first (config and table only, no weight read).
    if (o.strict) GPTQ_TRY(llama_model::open(o.model_path, {.strict = true}).to_status());
    llama_cuda_options co;
    co.device    = o.device.index;
    co.n_ctx     = o.n_ctx_hint;
    co.page_size = o.kv_page_size;
    GPTQ_TRY(placement_plan(o, &co));
    auto s  = std::make_unique<model_session_cuda>();
    s->dev_ = o.device;
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
