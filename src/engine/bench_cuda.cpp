// The CUDA adapter of gptq bench (bench_backend.h) over the engine's GPU session (engine_cuda.h,
// model/llama_cuda.h). Builds without CUDA too: opening then fails with device_check's message.
// Batch B: B sequences in lockstep on the GPU model (llama_cuda_model::decode_batch: one KV cache
// per sequence, every decode kernel launched once for all B, B <= 16); memory is the device bytes
// the model allocated (weights, KV caches, activations), not a driver-level peak.
#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bench_backend.h"
#include "core/error.h"
#include "engine_cuda.h"
#include "model/llama.h"

namespace gptq {

namespace {

class bench_backend_cuda final : public bench_backend {
public:
    std::unique_ptr<gpu_session> gpu;
    device_spec                  dev;
    std::string                  weights_name;
    std::string                  machine_name;
    std::vector<float>           logits;
    int64_t                      n_ctx = 0;

    int64_t     n_vocab() const override { return gpu->n_vocab(); }
    std::string weights() const override { return weights_name; }
    std::string device() const override { return device_name(dev); }
    std::string machine() const override { return machine_name; }
    int         n_threads() const override { return 1; }

    status reset(int64_t n_seq, int64_t ctx) override {
        if (n_seq >= 1) GPTQ_TRY(gpu->sequences_reserve(n_seq));  // 0: between rows, keep what is there
        if (ctx > n_ctx) {
            GPTQ_TRY(gpu->context_reserve(ctx));
            n_ctx = ctx;
        }
        gpu->reset();
        logits.assign(static_cast<size_t>(std::max<int64_t>(n_seq, 1) * gpu->n_vocab()), 0.0f);
        return status::ok();
    }
    // Both return once the logits are on the host.
    status prefill(const int32_t* ids, int64_t n_seq, int64_t n_tokens) override {
        if (n_seq == 1) return gpu->prefill(ids, n_tokens, logits.data(), /*all_logits=*/false);
        return gpu->prefill_batch(ids, n_seq, n_tokens, logits.data());
    }
    status decode_step(const int32_t* ids, int64_t n_seq) override {
        if (n_seq == 1) return gpu->decode(ids[0], logits.data());
        return gpu->decode_batch(ids, n_seq, logits.data());
    }
    uint64_t    memory_used() const override { return gpu->device_bytes(); }
    void        memory_reset_peak() override {}
    std::string memory_kind() const override { return "device_allocated"; }
    status      profile_ops(bool on) override {
        gpu->set_profile_ops(on);
        return status::ok();
    }
    gpu_op_profile op_profile() const override { return gpu->decode_profile(); }
};

}  // namespace

result<std::unique_ptr<bench_backend>> bench_backend_cuda_open(const std::string& model_path, const device_spec& dev,
                                                               int64_t n_ctx, const gpu_placement_flags& placement) {
    auto b = std::make_unique<bench_backend_cuda>();
    b->dev = dev;
    {
        GPTQ_ASSIGN_OR_RETURN(auto m, llama_model::open(model_path));  // config only, for the weights' name
        if (const gptq_config* q = m->quantization())
            b->weights_name = fmt::format("gptq-{}bit-g{}{}", q->bits, q->group_size, q->desc_act ? "-act" : "");
        else
            b->weights_name = m->config().dtype_name.empty() ? "unknown" : m->config().dtype_name;
    }
    GPTQ_ASSIGN_OR_RETURN(b->gpu, gpu_session::open(model_path, dev, n_ctx, placement));
    b->n_ctx        = n_ctx;
    b->machine_name = b->gpu->describe();
    return std::unique_ptr<bench_backend>(std::move(b));
}

}  // namespace gptq
