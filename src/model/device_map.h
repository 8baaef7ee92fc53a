// The device-map planner (docs/multi-gpu.md): which GPU (or the CPU) holds each module of a Llama
// model, from `--max-memory 0=40GiB,1=40GiB,cpu=200GiB` and `--device-map auto|FILE.json`.
//
// Modules are the units of placement, in execution order: "model.embed_tokens", "model.layers.0"
// .. "model.layers.<n_layer-1>", "model.norm", "lm_head" (the Hugging Face module names, so that a
// transformers/accelerate device_map file reads as it is). Devices: a GPU index >= 0, or
// k_device_cpu: held in host memory (pinned) and streamed to the execution GPU when run.
//
//     GPTQ_ASSIGN_OR_RETURN(auto mem, max_memory_parse("0=8GiB,1=8GiB,cpu=64GiB"));
//     auto costs = device_map_costs(hp, gptq_cfg_or_null, {.n_ctx = 4096, .batch = 1});
//     GPTQ_ASSIGN_OR_RETURN(device_plan plan, device_map_auto(costs, mem));   // refuses what cannot fit
//     std::fputs(device_plan_table(plan).c_str(), stdout);
//
// Nothing here touches a GPU: the CUDA runtime consumes a device_plan (docs/multi-gpu.md says how).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/gptq_config.h"
#include "model/llama.h"

namespace gptq {

constexpr int k_device_cpu = -1;  // a module kept in host memory and streamed to the GPU ("cpu")

std::string device_map_device_name(int device);  // "cuda:0", "cpu"

// ---- --max-memory ---------------------------------------------------------------------------------

struct max_memory_entry {
    int      device = 0;  // GPU index or k_device_cpu
    uint64_t bytes  = 0;
};
// GPUs in index order, then the CPU entry when given.
struct max_memory {
    std::vector<max_memory_entry> entries;

    const max_memory_entry* find(int device) const;  // nullptr when the device has no limit given
    std::vector<int>        gpus() const;            // GPU indices, ascending
};

// "0=40GiB,1=40GiB,cpu=200GiB": comma-separated DEVICE=SIZE items; DEVICE is a GPU index, "cuda:N"
// or "cpu"; SIZE a non-negative number with an optional unit, case-insensitive: B, KB/MB/GB/TB
// (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024); no unit means bytes. Errors quote the bad
// item (unknown device, malformed size, unit, duplicate device, empty item).
result<max_memory> max_memory_parse(const std::string& s);
std::string        max_memory_format(const max_memory& m);  // back to the flag's form, e.g. "0=8GiB,cpu=64GiB"

// ---- what each module costs ----------------------------------------------------------------------

struct device_map_options {
    int64_t n_ctx = 4096;  // KV-cache positions per sequence (the CUDA runtime's default context)
    int64_t batch = 1;     // sequences held at once
};

struct module_cost {
    std::string name;          // "model.layers.3"
    uint64_t    weight_bytes;  // as held on the GPU: F16 dense tensors, packed GPTQ tensors as in the checkpoint
    uint64_t    cache_bytes;   // on the execution GPU besides the weights: a layer's KV cache, lm_head's logits
};

// The model's modules with their costs, plus the fixed per-GPU reserve. The formulas are in
// docs/multi-gpu.md ("What a module costs").
struct device_map_costs {
    std::vector<module_cost> modules;                // execution order
    uint64_t                 gpu_reserve_bytes = 0;  // each GPU in use: activations + scratch + workspace
    bool                     tie_embeddings    = false;
    device_map_options       options;
};

// gptq: the checkpoint's GPTQ settings (its linears counted as packed qweight/qzeros/scales/g_idx),
// or nullptr for a dense checkpoint (everything F16).
device_map_costs device_map_costs_llama(const llama_hparams& hp, const gptq_config* gptq, const device_map_options& o);

// ---- the plan ---------------------------------------------------------------------------------------

struct device_plan_module {
    std::string name;
    int         device       = 0;
    uint64_t    weight_bytes = 0;  // 0 for a tied lm_head on the embeddings' device (shares the table)
    uint64_t    cache_bytes  = 0;  // lives on the execution device (the module's GPU, or exec_device if cpu)
};

struct device_plan_usage {
    int      device        = 0;
    bool     has_limit     = false;  // --max-memory gave this device a limit
    uint64_t limit_bytes   = 0;
    int64_t  n_modules     = 0;
    uint64_t weight_bytes  = 0;  // modules placed here
    uint64_t cache_bytes   = 0;  // KV cache / logits of the modules executed here (incl. offloaded ones)
    uint64_t reserve_bytes = 0;  // GPU in use: gpu_reserve_bytes
    uint64_t staging_bytes = 0;  // execution GPU of offloaded modules: two buffers of the largest one

    uint64_t total() const { return weight_bytes + cache_bytes + reserve_bytes + staging_bytes; }
    bool     over() const { return has_limit && total() > limit_bytes; }
};

struct device_plan {
    std::string                     source;  // "auto" or the map file's path
    device_map_options              options;
    std::vector<device_plan_module> modules;  // execution order
    std::vector<device_plan_usage>  devices;  // GPUs used or limited (ascending), then cpu when used or limited
    int                             exec_device = k_device_cpu;  // GPU that runs the cpu modules (cpu: no GPU at all)

    const device_plan_usage* usage(int device) const;
    int64_t                  n_offloaded() const;  // modules on cpu
};

// Sequential "auto" placement (accelerate's infer_auto_device_map with max_memory): modules in
// order onto the GPUs in index order, moving to the next GPU when one is full, then the rest to
// cpu when a cpu limit is given. Refuses (STATUS_OUT_OF_MEMORY) with "needs X GiB more than
// --max-memory allows: ..." when it cannot fit.
result<device_plan> device_map_auto(const device_map_costs& costs, const max_memory& mem);

// A map given as module (or prefix) -> device: resolved longest-prefix-first, every module covered,
// no unknown names; then checked against mem's limits (devices without a limit are not checked).
struct device_map_spec {
    std::vector<std::pair<std::string, int>> entries;  // as written, in file order
};
// The JSON object of a --device-map file: values are a GPU index (int), "cuda:N", "cuda" (GPU 0) or
// "cpu"; "disk" is refused (not supported). `where` names the file in messages.
result<device_map_spec> device_map_spec_parse(const std::string& json_text, const std::string& where);
result<device_map_spec> device_map_spec_load(const std::string& path);
result<device_plan> device_map_apply(const device_map_costs& costs, const device_map_spec& spec, const max_memory& mem,
                                     const std::string& source);

// ---- a plan on one GPU: which modules are offloaded ------------------------------------------------

// What the one-GPU runtime (llama_cuda_options::offload) keeps in pinned host memory and copies to
// the GPU each time it runs: decoder layers by index, and the three global modules.
struct offload_placement {
    std::vector<int64_t> layers;  // ascending
    bool                 embed   = false;
    bool                 norm    = false;
    bool                 lm_head = false;

    bool    any() const { return !layers.empty() || embed || norm || lm_head; }
    int64_t n_modules() const { return int64_t(layers.size()) + embed + norm + lm_head; }
};

// The plan as run on GPU `device` alone: modules on `device` stay resident, modules on cpu are
// offloaded. A module on another GPU, or offloaded modules meant to run on another GPU, is refused
// (STATUS_UNSUPPORTED: executing a plan over several GPUs needs the pipeline runtime, not built
// yet). n_layer: the model's layer count (module names are checked against it).
result<offload_placement> device_plan_offload_placement(const device_plan& plan, int device, int64_t n_layer);

// A short table: module ranges per device, then per-device totals against --max-memory.
std::string device_plan_table(const device_plan& plan);
// The plan as a --device-map file: {"model.embed_tokens": 0, ..., "lm_head": "cpu"}, one module a line.
std::string device_plan_json(const device_plan& plan);

// "1.5 GiB", "250.0 MiB", "12 B".
std::string device_map_bytes_str(uint64_t bytes);

}  // namespace gptq
