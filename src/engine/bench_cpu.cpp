// The CPU adapter of gptq bench (bench_backend.h): llama_model::forward_batch with one KV cache
// per sequence; memory is the process's peak RSS (VmHWM), reset through /proc/self/clear_refs.
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_backend.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/llama.h"

namespace gptq {

namespace {

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

class bench_backend_cpu final : public bench_backend {
public:
    std::unique_ptr<llama_model> model;
    std::unique_ptr<thread_pool> pool;
    int                          threads = 0;
    std::vector<kv_cache>        caches;
    std::vector<kv_cache*>       cache_ptrs;
    std::vector<float>           logits;
    std::vector<int64_t>         lens;
    std::string                  machine_name = cpu_machine();

    int64_t     n_vocab() const override { return model->hparams().n_vocab; }
    std::string device() const override { return "cpu"; }
    std::string machine() const override { return machine_name; }
    int         n_threads() const override { return threads; }
    std::string weights() const override {
        if (const gptq_config* q = model->quantization())
            return fmt::format("gptq-{}bit-g{}{}", q->bits, q->group_size, q->desc_act ? "-act" : "");
        const std::string& d = model->config().dtype_name;
        return d.empty() ? "unknown" : d;
    }

    status reset(int64_t n_seq, int64_t n_ctx) override {
        const bool same = static_cast<int64_t>(caches.size()) == n_seq && !caches.empty() && caches[0].n_ctx == n_ctx;
        if (same) {
            for (auto& c : caches) c.clear();
            return status::ok();
        }
        caches.clear();
        caches.shrink_to_fit();
        for (int64_t s = 0; s < n_seq; ++s) caches.push_back(kv_cache::create(model->hparams(), n_ctx));
        cache_ptrs.clear();
        for (auto& c : caches) cache_ptrs.push_back(&c);
        logits.assign(static_cast<size_t>(n_seq * model->hparams().n_vocab), 0.0f);
        return status::ok();
    }

    status check_batch(int64_t n_seq) const {
        if (n_seq != static_cast<int64_t>(caches.size()))
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "bench: batch of {} sequences after reset({})",
                              n_seq, caches.size());
        return status::ok();
    }

    status prefill(const int32_t* ids, int64_t n_seq, int64_t n_tokens) override {
        GPTQ_TRY(check_batch(n_seq));
        lens.assign(static_cast<size_t>(n_seq), n_tokens);
        const ops_context ctx{pool.get(), false};
        return model->forward_batch(ctx, ids, lens.data(), n_seq, cache_ptrs.data(), logits.data());
    }

    status decode_step(const int32_t* ids, int64_t n_seq) override {
        GPTQ_TRY(check_batch(n_seq));
        lens.assign(static_cast<size_t>(n_seq), 1);
        const ops_context ctx{pool.get(), false};
        return model->forward_batch(ctx, ids, lens.data(), n_seq, cache_ptrs.data(), logits.data());
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
};

}  // namespace

result<std::unique_ptr<bench_backend>> bench_backend_cpu_open(const std::string& model_path, int n_threads) {
    if (n_threads < 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--threads is {}, expected >= 0", n_threads);
    auto b     = std::make_unique<bench_backend_cpu>();
    b->threads = n_threads > 0 ? n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    GPTQ_ASSIGN_OR_RETURN(b->model, llama_model::open(model_path));
    GPTQ_TRY(b->model->layers_load_all());
    GPTQ_TRY(b->model->globals_load());
    b->pool = std::make_unique<thread_pool>(b->threads);
    return std::unique_ptr<bench_backend>(std::move(b));
}

}  // namespace gptq
