// The GPTQ quantization config: quantize_config.json / quant_config.json / config.json
// "quantization_config", in the AutoGPTQ, GPTQModel and transformers dialects (format.md 1.7).
#pragma once

#include <string>
#include <vector>

#include "core/status.h"
#include "io/json_file.h"

namespace gptq {

enum class gptq_checkpoint_format : uint8_t {
    GPTQ_FORMAT_V1,      // "gptq": qzeros store zero - 1 (AutoGPTQ, TheBloke; safe for sym only)
    GPTQ_FORMAT_V2,      // "gptq_v2": qzeros store zero itself (GPTQModel)
    GPTQ_FORMAT_MARLIN,  // "marlin": AutoGPTQ's serialized Marlin layout (B/s tensors)
};
const char* gptq_checkpoint_format_name(gptq_checkpoint_format f);

struct gptq_config {
    std::string              source;  // file it came from (and key, for config.json)
    int                      bits            = 4;
    int                      group_size      = 128;  // -1: one group per row
    bool                     desc_act        = false;
    bool                     sym             = true;
    bool                     static_groups   = false;
    bool                     true_sequential = true;
    double                   damp_percent    = 0.01;
    bool                     lm_head         = false;
    gptq_checkpoint_format   format          = gptq_checkpoint_format::GPTQ_FORMAT_V1;
    std::string              quant_method    = "gptq";
    std::string              pack_dtype      = "int32";
    std::string              model_file_base_name;  // "" when absent or null
    std::vector<std::string> quantizer;             // meta.quantizer, e.g. "gptqmodel:4.0.0"
    json                     raw;                   // the object as read

    json to_json() const;  // the dict we write (both files), format.md 1.7 "minimal robust set"
};

// Parse a quantization config object. Checks bits in {2,3,4,8}, group_size -1 or positive,
// damp_percent in (0,1), quant_method "gptq", pack_dtype "int32".
result<gptq_config> gptq_config_parse(const json& j, const std::string& where);

// Find and parse the GPTQ config of a checkpoint folder: quantize_config.json, quant_config.json,
// then config.json quantization_config. Returns NOT_FOUND when the folder has none.
result<gptq_config> gptq_config_find(const std::string& folder);

}  // namespace gptq
