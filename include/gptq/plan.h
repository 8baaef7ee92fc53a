// gptq plan: where each module of a model would live (GPUs in pipeline order, overflow offloaded to
// CPU memory) for a --device-map and --max-memory, without loading or running anything
// (docs/multi-gpu.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct plan_params {
    std::string model_path;           // model folder (config.json; a GPTQ checkpoint's quantize config)
    std::string device_map = "auto";  // "auto" or a JSON file {"model.embed_tokens": 0, ..., "lm_head": "cpu"}
    std::string max_memory = "";      // "0=40GiB,1=40GiB,cpu=200GiB"; required for auto, optional for a file
    int64_t     n_ctx      = 0;       // KV-cache positions; 0: max_position_embeddings, at most 4096
    int64_t     batch      = 1;       // sequences held at once
};

struct plan_report {
    std::string table;  // the plan as a short table
    std::string json;   // the plan as a --device-map file
    int64_t     n_modules   = 0;
    int64_t     n_offloaded = 0;  // modules on cpu
    int64_t     n_gpus      = 0;  // GPUs holding modules
};

// Plan the model; a plan that does not fit is an error (STATUS_OUT_OF_MEMORY) saying by how much.
result<plan_report> plan_model(const plan_params& params);

// The plan of a command that runs the model on one GPU (`gptq ppl|generate|bench --device cuda:N
// --device-map ... --max-memory ...`): modules on cuda:N stay resident, modules on cpu are offloaded
// (kept in pinned host memory and copied to the GPU each time they run). Unlike `gptq plan`, a
// --max-memory without a cpu entry lets the rest go to cpu, up to the host memory available (the
// `note` says so; `cpu=0` forbids offloading). A plan that puts modules on another GPU is refused
// (STATUS_UNSUPPORTED): running a plan over several GPUs needs the pipeline runtime (issue #10).
struct device_offload_plan {
    std::string          table;           // the plan, as `gptq plan` prints it
    std::string          note;            // a line about defaults applied, or empty
    std::vector<int64_t> offload_layers;  // decoder layers on cpu, ascending
    bool                 offload_embed   = false;
    bool                 offload_norm    = false;
    bool                 offload_lm_head = false;
    int64_t              n_modules       = 0;
    int64_t              n_offloaded     = 0;
};
result<device_offload_plan> plan_for_device(const plan_params& params, int device);

}  // namespace gptq
