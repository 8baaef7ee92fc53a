// gptq plan MODEL [--device-map auto|FILE] [--max-memory ...] [--ctx N] [--batch B] [--json]
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/plan.h"

namespace gptq::cli {

command register_plan(CLI::App& app) {
    auto o    = std::make_shared<plan_params>();
    auto json = std::make_shared<bool>(false);
    auto sub  = app.add_subcommand("plan", "show which GPU (or CPU memory) would hold each module; loads nothing");
    sub->add_option("model", o->model_path, "model folder")->required();
    sub->add_option("--device-map", o->device_map,
                    "auto (sequential fill of the GPUs in index order, overflow to cpu) or a JSON file "
                    "{\"model.embed_tokens\": 0, \"model.layers\": 1, \"lm_head\": \"cpu\"} (default: auto)");
    sub->add_option("--max-memory", o->max_memory,
                    "memory per device, e.g. 0=40GiB,1=40GiB,cpu=200GiB (required for auto; cpu= allows offloading)");
    sub->add_option("--ctx", o->n_ctx, "KV-cache positions per sequence (default: the model's, at most 4096)");
    sub->add_option("--batch", o->batch, "sequences held at once (default: 1)");
    sub->add_flag("--json", *json, "print the plan as a --device-map file (edit it and feed it back)");
    return {sub, [o, json] {
                auto r = plan_model(*o);
                if (!r) return report_error(r.error());
                std::fputs((*json ? r->json : r->table).c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
