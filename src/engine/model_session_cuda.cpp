// The CUDA model_session (model_session.h) over llama_cuda_model's public API (model/llama_cuda.h),
// whose sequence slots each keep their own page table (a shared pool of KV pages, docs/cuda.md "KV
// pages") and position: every step shape runs (ragged()). A step of one-token sequences is one
// ragged decode pass (one launch of each kernel for all of them, a CUDA graph per count;
// docs/cuda.md "Ragged decode"); a step with prompt chunks beside other sequences is one mixed pass
// (llama_cuda_model::step_mixed: every linear once over all tokens, attention per chunk and one
// ragged launch for the decode tokens; docs/cuda.md "Mixed passes"); the rest (a lone chunk,
// every row's logits, LongRoPE's switch, more than k_mixed_max_tokens) each sequence with several
// tokens through the prefill kernels on its own, then the one-token ones in one decode pass. Builds without
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
#include "lora_load.h"
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

// The most tokens a step runs as one mixed pass: its activations (and logits buffer) are sized for
// all of them. A larger step (a lockstep prefill of many prompts: bench, generate) runs each chunk
// on its own, as before; serve's steps hold --prefill-chunk prompt tokens plus the decode tokens.
constexpr int64_t k_mixed_max_tokens = 2048;

// Whether a step runs as one mixed pass: prompt chunks beside other sequences, the last row's logits
// only, no sequence crossing LongRoPE's switch (re-run on its own), within k_mixed_max_tokens.
bool mixed_step(const llama_cuda_model& m, std::span<const seq_step> steps) {
    if (steps.size() < 2) return false;
    int64_t total = 0;
    bool    chunk = false;
    for (const seq_step& s : steps) {
        if (s.all_logits || m.host().rope_needs_reprefill(m.seq_pos(s.seq), s.n_tokens)) return false;
        chunk = chunk || s.n_tokens > 1;
        total += s.n_tokens;
    }
    return chunk && total <= k_mixed_max_tokens;
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
    status step_top(std::span<const seq_step> steps, int64_t k, const float* inv_temp, logits_top* out) override;
    status step_row_logits(int64_t row, float* logits) override;
    result<int64_t> warm_up(int64_t max_batch, int64_t max_chunk) override;
    status          evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora = -1) override;

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
    void           lora_name_add(const std::string& name) { lora_names_.push_back(name); }

private:
    status loras_select(std::span<const seq_step> steps);
    // The step as one mixed pass (mixed_step said so); logits nullptr: left on the GPU.
    status mixed_run(std::span<const seq_step> steps, float* logits);

    std::vector<llama_cuda_segment> segs_;  // a mixed step's segments

    int64_t              n_seq_ = 0, n_ctx_ = 0;  // reserved (the GPU's caches may be larger)
    std::vector<int32_t> ids_;                    // a step's one-token sequences: ids, slots
    std::vector<int64_t> seqs_;
    std::vector<float>   logits_;  // their logits
    // step_top: where each row's whole logits are: >= 0 the row of the decode pass on the GPU, else
    // -1 - i for the host row i of prefill_rows_ (the prefills' last rows); top_host_: the base
    // class's host path ran (all_logits, or a LongRoPE switch).
    std::vector<int64_t> row_src_;
    std::vector<float>   prefill_rows_;
    bool                 top_host_ = false;
};

std::string model_session_cuda::describe() const {
    const auto& m = *gpu_;
    std::string s = fmt::format(
        "{}: weights {:.1f} MiB (GPTQ linears: {} int4 kernel{}, {} generic), KV cache {:.1f} MiB ({} pages of {} "
        "positions)",
        device_name(dev_), m.weight_bytes() / 1048576.0, m.n_gptq_fast(), m.lm_head_int4() ? " incl. lm_head" : "",
        m.n_gptq_generic(), m.cache_bytes() / 1048576.0, m.kv_pages_total(), m.page_size());
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

status model_session_cuda::mixed_run(std::span<const seq_step> steps, float* logits) {
    segs_.clear();
    for (const seq_step& s : steps) segs_.push_back({.seq = s.seq, .ids = s.ids, .n = s.n_tokens});
    return gpu_->step_mixed(segs_.data(), static_cast<int64_t>(segs_.size()), logits);
}

// A mixed step in one pass; otherwise sequences with several tokens one by one through the
// prefill kernels, then every one-token sequence in one ragged decode pass; the logits rows in the
// order of the steps.
status model_session_cuda::step(std::span<const seq_step> steps, float* logits) {
    top_rows_ = 0;  // step_row_logits reads step_top's rows only
    GPTQ_TRY(steps_check(steps));
    GPTQ_TRY(pages_check(*gpu_, steps, device()));
    GPTQ_TRY(loras_select(steps));
    if (mixed_step(*gpu_, steps)) return mixed_run(steps, logits);  // one row per step (no all_logits)
    const int64_t V   = n_vocab();
    int64_t       row = 0;
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

// Each listed slot's adapter for this step (the step inputs carry it per token).
status model_session_cuda::loras_select(std::span<const seq_step> steps) {
    if (gpu_->n_loras() == 0) return status::ok();  // lora_check allowed -1 only
    for (const seq_step& s : steps) GPTQ_TRY(gpu_->seq_lora_set(s.seq, s.lora));
    return status::ok();
}

// As step(), with the candidates selected on the GPU: a mixed pass's rows stay on the GPU; on the
// separate passes a prefill's last row is downloaded whole too (kept for step_row_logits), the
// decode pass's rows stay on the GPU.
status model_session_cuda::step_top(std::span<const seq_step> steps, int64_t k, const float* inv_temp,
                                    logits_top* out) {
    GPTQ_TRY(steps_check(steps));
    GPTQ_TRY(pages_check(*gpu_, steps, device()));
    GPTQ_TRY(loras_select(steps));
    top_host_ = false;
    top_rows_ = 0;
    for (const seq_step& s : steps)
        if (s.all_logits || (s.n_tokens == 1 && model().rope_needs_reprefill(gpu_->seq_pos(s.seq), 1))) {
            top_host_ = true;
            return model_session::step_top(steps, k, inv_temp, out);
        }
    if (k < 1 || k > k_logits_top_max)
        return make_error(E_ARG, "step_top: {} candidates per row; 1 to {} are supported", k, k_logits_top_max);
    const int64_t V = n_vocab(), n = static_cast<int64_t>(steps.size());
    k = std::min(k, V);
    out->resize(n, k);
    row_src_.assign(size_t(n), 0);
    prefill_rows_.clear();
    if (mixed_step(*gpu_, steps)) {  // row i of the pass is step i's
        GPTQ_TRY(mixed_run(steps, nullptr));
        GPTQ_TRY(gpu_->logits_top_download(n, k, inv_temp, out));
        for (int64_t i = 0; i < n; ++i) row_src_[size_t(i)] = i;
        top_rows_ = n;
        return status::ok();
    }
    ids_.clear();
    seqs_.clear();
    std::vector<int64_t> decode_rows;
    std::vector<float>   decode_temp;
    logits_top           part;
    for (int64_t i = 0; i < n; ++i) {
        const seq_step& s = steps[size_t(i)];
        if (s.n_tokens == 1) {
            ids_.push_back(s.ids[0]);
            seqs_.push_back(s.seq);
            decode_rows.push_back(i);
            if (inv_temp) decode_temp.push_back(inv_temp[i]);
            continue;
        }
        const size_t h = prefill_rows_.size();
        prefill_rows_.resize(h + size_t(V));
        GPTQ_TRY(gpu_->prefill_seq(s.seq, s.ids, s.n_tokens, prefill_rows_.data() + h, false));
        GPTQ_TRY(gpu_->logits_top_download(1, k, inv_temp ? inv_temp + i : nullptr, &part));
        out->set_row(i, part, 0);
        row_src_[size_t(i)] = -1 - static_cast<int64_t>(h / size_t(V));
    }
    if (!ids_.empty()) {
        const int64_t nd = static_cast<int64_t>(ids_.size());
        GPTQ_TRY(gpu_->decode_seqs(ids_.data(), seqs_.data(), nd, nullptr));
        GPTQ_TRY(gpu_->logits_top_download(nd, k, inv_temp ? decode_temp.data() : nullptr, &part));
        for (int64_t j = 0; j < nd; ++j) {
            out->set_row(decode_rows[size_t(j)], part, j);
            row_src_[size_t(decode_rows[size_t(j)])] = j;
        }
    }
    top_rows_ = n;
    return status::ok();
}

status model_session_cuda::step_row_logits(int64_t row, float* logits) {
    if (top_host_) return model_session::step_row_logits(row, logits);
    if (row < 0 || row >= top_rows_)
        return make_error(E_ARG, "step_row_logits: row {} of a step_top of {} rows", row, top_rows_);
    const int64_t src = row_src_[size_t(row)];
    if (src >= 0) return gpu_->logits_row_download(src, logits);
    std::copy_n(prefill_rows_.data() + (-1 - src) * n_vocab(), n_vocab(), logits);
    return status::ok();
}

// The chunk first (growing the activations drops every graph), then each batch size twice: a plain
// step that sizes the scratch, then the capture (llama_cuda_model::decode_step).
result<int64_t> model_session_cuda::warm_up(int64_t max_batch, int64_t max_chunk) {
    max_batch = std::min(max_batch, n_seq_);
    if (max_batch < 1 || n_ctx_ < 3) return int64_t(0);
    for (int64_t s = 0; s < n_seq_; ++s) gpu_->seq_reset(s);
    // Within the KV pages: the chunk in the free pages, each decoding slot holding 2 positions.
    const int64_t P = gpu_->page_size(), free = gpu_->kv_pages_free();
    max_chunk = std::min({max_chunk, n_ctx_, free * P});
    max_batch = std::min(max_batch, free / ((2 + P - 1) / P));
    if (max_batch < 1) return int64_t(0);
    int64_t shapes = 0;
    // The largest mixed step first (a chunk beside a decode token in every other slot, as far as the
    // pages go): growing the activations or the scratch (act-order linears permute the step's rows
    // into it) later would drop the graphs captured below.
    GPTQ_TRY(gpu_->tokens_reserve(std::min(max_chunk + max_batch, k_mixed_max_tokens)));
    if (max_chunk > 1) {
        const int64_t chunk_pages = (max_chunk + P - 1) / P;
        const int64_t n_dec =
            std::max<int64_t>(0, std::min({max_batch - 1, free - chunk_pages, k_mixed_max_tokens - max_chunk}));
        std::vector<int32_t>            ids(static_cast<size_t>(max_chunk), 0);
        std::vector<llama_cuda_segment> segs = {{.seq = 0, .ids = ids.data(), .n = max_chunk}};
        for (int64_t s = 1; s <= n_dec; ++s) segs.push_back({.seq = s, .ids = ids.data(), .n = 1});
        GPTQ_TRY(gpu_->step_mixed(segs.data(), int64_t(segs.size()), nullptr));
        for (int64_t s = 0; s <= n_dec; ++s) gpu_->seq_reset(s);
        ++shapes;
    }
    std::vector<int32_t> ids(static_cast<size_t>(max_batch), 0);
    std::vector<int64_t> seqs(static_cast<size_t>(max_batch));
    for (int64_t s = 0; s < max_batch; ++s) seqs[size_t(s)] = s;
    for (int64_t n = 1; n <= max_batch; ++n) {
        for (int rep = 0; rep < 2; ++rep) GPTQ_TRY(gpu_->decode_seqs(ids.data(), seqs.data(), n, nullptr));
        for (int64_t s = 0; s < n; ++s) gpu_->seq_reset(s);
        ++shapes;
    }
    return shapes;
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
    if (gpu_->n_loras() > 0) GPTQ_TRY(gpu_->seq_lora_set(0, lora));
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
