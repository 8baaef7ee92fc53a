// Fuzz entry point for the device-map planner's inputs (src/model/device_map.h): a --max-memory
// string and a --device-map JSON file, both written by users or copied from elsewhere.
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_targets.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "model/device_map.h"
#include "model/llama.h"

namespace gptq::fuzz {

namespace {

// A Llama-shaped config small enough to plan in microseconds (4 layers, GQA, untied lm_head).
const llama_hparams& fuzz_hparams() {
    static const llama_hparams hp = [] {
        auto j = json_parse(R"({"model_type": "llama", "hidden_size": 256, "intermediate_size": 768,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})",
                            "fuzz_plan");
        GPTQ_ASSERT(j.is_ok());
        auto cfg = model_config_parse(*j, "fuzz_plan");
        GPTQ_ASSERT(cfg.is_ok());
        auto h = llama_hparams_from_config(*cfg);
        GPTQ_ASSERT(h.is_ok());
        return *h;
    }();
    return hp;
}

void check_plan(const device_plan& plan, const device_map_costs& costs) {
    GPTQ_ASSERT(plan.modules.size() == costs.modules.size());
    for (const auto& u : plan.devices) GPTQ_ASSERT(!u.over());
    (void)device_plan_table(plan);
}

}  // namespace

int fuzz_device_map(const uint8_t* data, size_t size) {
    // First line: the --max-memory value; the rest: a --device-map file.
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const size_t           nl   = text.find('\n');
    const std::string      mem  = std::string(text.substr(0, nl));
    const std::string      file = nl == std::string_view::npos ? std::string() : std::string(text.substr(nl + 1));

    const device_map_costs costs = device_map_costs_llama(fuzz_hparams(), nullptr, {});
    auto                   m     = max_memory_parse(mem);
    if (m) {
        (void)max_memory_format(*m);
        if (auto plan = device_map_auto(costs, *m)) {
            check_plan(*plan, costs);
            // The printed plan is a map file that gives the same plan back.
            auto spec = device_map_spec_parse(device_plan_json(*plan), "fuzz:auto");
            GPTQ_ASSERT(spec.is_ok());
            auto again = device_map_apply(costs, *spec, *m, "fuzz:auto");
            GPTQ_ASSERT(again.is_ok());
            GPTQ_ASSERT(device_plan_json(*again) == device_plan_json(*plan));
        }
    }
    auto spec = device_map_spec_parse(file, "fuzz:device_map.json");
    if (spec) {
        const max_memory none;
        if (auto plan = device_map_apply(costs, *spec, m ? *m : none, "fuzz:device_map.json")) {
            check_plan(*plan, costs);
            (void)device_plan_json(*plan);
        }
    }
    return 0;
}

}  // namespace gptq::fuzz
