// gptq plan: config.json (+ the GPTQ config) -> module costs -> device plan (model/device_map.h).
#include "gptq/plan.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#include "host_memory.h"
#include "io/checkpoint.h"
#include "io/gptq_config.h"
#include "io/hf_config.h"
#include "model/device_map.h"
#include "model/llama.h"

namespace gptq {

namespace {
// The CUDA runtime's default context (llama_cuda.h k_llama_cuda_default_ctx).
constexpr int64_t k_plan_default_ctx = 4096;
constexpr int64_t k_plan_max_ctx     = int64_t(1) << 24;
constexpr int64_t k_plan_max_batch   = int64_t(1) << 12;
}  // namespace

namespace {
// The plan of p; cpu_default: the cpu limit added when --max-memory gives none (0: none added).
result<device_plan> plan_build(const plan_params& p, uint64_t cpu_default, std::string* note) {
    // Bounds keep the byte counts far from overflow (n_ctx x batch x n_vocab x 4 < 2^63).
    if (p.batch < 1 || p.batch > k_plan_max_batch)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--batch {} is outside [1, {}]", p.batch,
                          k_plan_max_batch);
    if (p.n_ctx < 0 || p.n_ctx > k_plan_max_ctx)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--ctx {} is outside [1, {}]", p.n_ctx, k_plan_max_ctx);
    GPTQ_ASSIGN_OR_RETURN(model_config cfg, model_config_load(p.model_path));
    GPTQ_ASSIGN_OR_RETURN(llama_hparams hp, llama_hparams_from_config(cfg));
    // The GPTQ settings as every command finds them (io/checkpoint.h); a folder holding only the
    // config files (no weights) is planned from them alone.
    GPTQ_ASSIGN_OR_RETURN(checkpoint_info ck, checkpoint_detect(p.model_path, {.need_weights = false}));
    GPTQ_TRY(ck.check());
    ck.log_warnings();
    const std::optional<gptq_config>& q = ck.gptq;

    device_map_options o;
    o.batch                      = p.batch;
    o.n_ctx                      = p.n_ctx > 0 ? p.n_ctx
                                               : std::min(k_plan_default_ctx,
                                     hp.max_position_embeddings > 0 ? hp.max_position_embeddings : k_plan_default_ctx);
    const device_map_costs costs = device_map_costs_llama(hp, q ? &*q : nullptr, o);

    max_memory mem;
    if (!p.max_memory.empty()) {
        GPTQ_ASSIGN_OR_RETURN(mem, max_memory_parse(p.max_memory));
    }
    if (cpu_default > 0 && !mem.entries.empty() && !mem.find(k_device_cpu)) {
        mem.entries.push_back({k_device_cpu, cpu_default});
        if (note)
            *note = fmt::format(
                "--max-memory {} has no cpu entry: what does not fit on the GPU is offloaded to host "
                "memory, up to the {} available (cpu=0 forbids offloading)",
                p.max_memory, device_map_bytes_str(cpu_default));
    }
    device_plan plan;
    if (p.device_map.empty() || p.device_map == "auto") {
        if (mem.entries.empty())
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "--device-map auto needs --max-memory (e.g. 0=40GiB,1=40GiB,cpu=200GiB)");
        GPTQ_ASSIGN_OR_RETURN(plan, device_map_auto(costs, mem));
    } else {
        GPTQ_ASSIGN_OR_RETURN(device_map_spec spec, device_map_spec_load(p.device_map));
        GPTQ_ASSIGN_OR_RETURN(plan, device_map_apply(costs, spec, mem, p.device_map));
    }
    return plan;
}
}  // namespace

result<plan_report> plan_model(const plan_params& p) {
    GPTQ_ASSIGN_OR_RETURN(device_plan plan, plan_build(p, 0, nullptr));
    plan_report r;
    r.table       = device_plan_table(plan);
    r.json        = device_plan_json(plan);
    r.n_modules   = int64_t(plan.modules.size());
    r.n_offloaded = plan.n_offloaded();
    for (const auto& d : plan.devices) r.n_gpus += d.device != k_device_cpu && d.n_modules > 0;
    return r;
}

result<device_offload_plan> plan_for_device(const plan_params& p, int device) {
    device_offload_plan r;
    GPTQ_ASSIGN_OR_RETURN(device_plan plan, plan_build(p, host_memory_available(), &r.note));
    const int64_t n_layer = int64_t(plan.modules.size()) - 3;
    GPTQ_ASSIGN_OR_RETURN(offload_placement off, device_plan_offload_placement(plan, device, n_layer));
    r.table           = device_plan_table(plan);
    r.offload_layers  = off.layers;
    r.offload_embed   = off.embed;
    r.offload_norm    = off.norm;
    r.offload_lm_head = off.lm_head;
    r.n_modules       = int64_t(plan.modules.size());
    r.n_offloaded     = off.n_modules();
    return r;
}

}  // namespace gptq
