// The CPU model_session (model_session.h) over llama_model: every layer resident in F32 (GPTQ
// linears stay quantized), one kv_cache per slot (F16 unless kv_f16 is off), and a step is one ragged batch through
// llama_model::forward_batch (layer_forward over the rows of every listed sequence; each sequence
// at its own position, prompt chunks and single decode tokens mixed). evaluate() is
// llama_model::forward with local K/V, what ppl has always run. Memory is the process's peak RSS
// (VmHWM), reset through /proc/self/clear_refs.
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "host_memory.h"
#include "lora_load.h"
#include "model_session.h"

namespace gptq {

namespace {

constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_OOM = status_code::STATUS_OUT_OF_MEMORY;

// A field of /proc/self/status in bytes ("VmHWM:", "VmRSS:"), 0 when unavailable.
uint64_t proc_status_bytes(const std::string& key) {
    std::ifstream in("/proc/self/status");
    std::string   line;
    while (std::getline(in, line))
        if (line.rfind(key, 0) == 0) return std::strtoull(line.c_str() + key.size(), nullptr, 10) * 1024;
    return 0;
}

std::string cpu_machine() {
    std::ifstream in("/proc/cpuinfo");
    std::string   line, model = "unknown CPU";
    while (std::getline(in, line))
        if (line.rfind("model name", 0) == 0) {
            const size_t colon = line.find(':');
            if (colon != std::string::npos) model = line.substr(line.find_first_not_of(" \t", colon + 1));
            break;
        }
    return fmt::format("{}, {} cores", model, std::max(1u, std::thread::hardware_concurrency()));
}

class model_session_cpu final : public model_session {
public:
    std::unique_ptr<llama_model> model_;
    std::unique_ptr<thread_pool> pool_;
    int                          n_threads_        = 0;
    bool                         int8_activations_ = true;  // model_session_options::int8_activations
    bool                         kv_f16_           = true;  // model_session_options::kv_f16
    std::string                  machine_          = cpu_machine();

    const llama_hparams& hparams() const override { return model_->hparams(); }
    const llama_model&   model() const override { return *model_; }
    std::string          device() const override { return "cpu"; }
    std::string          describe() const override { return machine_; }
    int                  n_threads() const override { return n_threads_; }
    bool                 ragged() const override { return true; }

    status  reserve(int64_t n_seq, int64_t n_ctx) override;
    int64_t n_seq() const override { return static_cast<int64_t>(caches_.size()); }
    int64_t n_ctx() const override { return n_ctx_; }
    void    seq_reset(int64_t seq) override {
        if (seq >= 0 && seq < n_seq()) caches_[static_cast<size_t>(seq)].clear();
    }
    int64_t seq_pos(int64_t seq) const override {
        return seq >= 0 && seq < n_seq() ? caches_[static_cast<size_t>(seq)].n_past : -1;
    }

    status step(std::span<const seq_step> steps, float* logits) override;
    status evaluate(const int32_t* ids, int64_t n, float* logits, int32_t lora) override {
        if (n < 1) return make_error(E_ARG, "evaluate: {} tokens, expected at least 1", n);
        GPTQ_TRY(ids_check(ids, n, "evaluate"));
        GPTQ_TRY(lora_check(lora, "evaluate"));
        return model_->forward(ops(false), ids, n, /*cache=*/nullptr, logits, lora);  // ppl: F32 products
    }
    void loras_add(std::vector<std::shared_ptr<const lora_adapter>> adapters) {
        for (auto& a : adapters) {
            lora_names_.push_back(a->name);
            model_->lora_add(std::move(a));
        }
    }

    uint64_t memory_used() const override {
        const uint64_t hwm = proc_status_bytes("VmHWM:");
        return hwm ? hwm : proc_status_bytes("VmRSS:");
    }
    void memory_reset_peak() override {
        // "5" resets the peak RSS to the current RSS (Linux >= 4.0); without it the peak is the
        // process's since start.
        std::ofstream f("/proc/self/clear_refs");
        if (f) f << "5";
    }
    std::string memory_kind() const override { return "host_rss"; }
    uint64_t    memory_available() const override { return host_memory_available(); }
    uint64_t    kv_bytes_per_position() const override { return kv_cache::bytes_per_position(hparams(), kv_f16_); }

private:
    // Generation (step): GPTQ linears take int8-rounded activations (ops.h), prompts and decode rows
    // alike; evaluate (perplexity) keeps the F32 products.
    ops_context ops(bool generation) const { return {pool_.get(), false, generation && int8_activations_}; }

    std::vector<kv_cache> caches_;  // one per slot, n_ctx_ positions each
    int64_t               n_ctx_ = 0;
    // A step's batch in forward_batch's layout (kept between steps: no allocation per decode step).
    std::vector<int32_t>    ids_;
    std::vector<int64_t>    n_tokens_;
    std::vector<kv_cache*>  batch_caches_;
    std::vector<int32_t>    loras_;
    std::unique_ptr<bool[]> all_logits_;
    size_t                  all_logits_size_ = 0;
};

status model_session_cpu::reserve(int64_t n_seq, int64_t n_ctx) {
    if (n_seq < 0 || (n_seq > 0 && n_ctx < 1))
        return make_error(E_ARG, "reserve: {} sequences of {} positions; expected n_seq >= 0 and n_ctx >= 1", n_seq,
                          n_ctx);
    if (n_seq == this->n_seq() && n_ctx == n_ctx_) {  // the same room: keep the caches, forget the sequences
        for (auto& c : caches_) c.clear();
        return status::ok();
    }
    caches_.clear();  // the old caches go before the new ones are allocated
    caches_.shrink_to_fit();
    n_ctx_ = 0;
    if (n_seq == 0) return status::ok();
    const llama_hparams& hp    = hparams();
    const double         bytes = double(kv_cache::bytes_per_position(hp, kv_f16_)) * double(n_ctx) * double(n_seq);
    const std::string    what  = fmt::format("a KV cache of {} sequence{} x {} positions ({} keys and values)", n_seq,
                                         n_seq == 1 ? "" : "s", n_ctx, kv_f16_ ? "F16" : "F32");
    const std::string    hint  = "ask for fewer sequences or positions";
    if (bytes > 0x1p62) return make_error(E_OOM, "{} is too large ({:.3g} bytes); {}", what, bytes, hint);
    GPTQ_TRY(host_memory_check(what, static_cast<uint64_t>(bytes), hint));
    try {
        caches_.reserve(static_cast<size_t>(n_seq));
        for (int64_t s = 0; s < n_seq; ++s) caches_.push_back(kv_cache::create(hp, n_ctx, kv_f16_));
    } catch (const std::bad_alloc&) {
        caches_.clear();
        caches_.shrink_to_fit();
        return make_error(E_OOM, "out of host memory while allocating {} ({})", what,
                          human_bytes(static_cast<uint64_t>(bytes)));
    }
    n_ctx_ = n_ctx;
    return status::ok();
}

status model_session_cpu::step(std::span<const seq_step> steps, float* logits) {
    top_rows_ = 0;  // step_row_logits reads step_top's rows only
    GPTQ_TRY(steps_check(steps));
    if (steps.empty()) return status::ok();
    const size_t n = steps.size();
    ids_.clear();
    n_tokens_.clear();
    batch_caches_.clear();
    loras_.clear();
    if (all_logits_size_ < n) all_logits_.reset(new bool[all_logits_size_ = n]);
    for (size_t i = 0; i < n; ++i) {
        const seq_step& s = steps[i];
        ids_.insert(ids_.end(), s.ids, s.ids + s.n_tokens);
        n_tokens_.push_back(s.n_tokens);
        batch_caches_.push_back(&caches_[static_cast<size_t>(s.seq)]);
        all_logits_[i] = s.all_logits;
        loras_.push_back(s.lora);
    }
    return model_->forward_batch(ops(true), ids_.data(), n_tokens_.data(), static_cast<int64_t>(n),
                                 batch_caches_.data(), logits, all_logits_.get(), loras_.data());
}

}  // namespace

result<std::unique_ptr<model_session>> model_session_open_cpu(const model_session_options& o) {
    auto s = std::make_unique<model_session_cpu>();
    GPTQ_ASSIGN_OR_RETURN(s->model_, llama_model::open(o.model_path, {.strict = o.strict, .keep_f16 = true}));
    GPTQ_ASSIGN_OR_RETURN(auto adapters, lora_adapters_open(o.loras, s->model_->hparams(), o.lora_stack));
    s->loras_add(std::move(adapters));
    const uint64_t    weights = s->model_->resident_bytes();
    const std::string what    = o.host_work_bytes == 0
                                    ? fmt::format("loading {}", o.model_path)
                                    : fmt::format("loading {} (weights {} + activations {})", o.model_path,
                                                  human_bytes(weights), human_bytes(o.host_work_bytes));
    GPTQ_TRY(host_memory_check(
        what, weights + o.host_work_bytes,
        o.host_work_hint.empty() ? "use a machine with more memory or a quantized checkpoint" : o.host_work_hint));
    try {
        GPTQ_TRY(s->model_->layers_load_all());
        GPTQ_TRY(s->model_->globals_load());
    } catch (const std::bad_alloc&) {
        return make_error(E_OOM, "out of host memory while loading {} (needs about {})", o.model_path,
                          human_bytes(weights));
    }
    s->n_threads_ = o.n_threads > 0 ? o.n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    s->pool_      = std::make_unique<thread_pool>(s->n_threads_);
    s->int8_activations_ = o.int8_activations;
    s->kv_f16_           = o.kv_f16;
    return std::unique_ptr<model_session>(std::move(s));
}

}  // namespace gptq
