// The GPTQ quantization config: quantize_config.json / quant_config.json / config.json
// "quantization_config", in the AutoGPTQ, GPTQModel and transformers dialects (format.md 1.7).
#pragma once

#include <memory>
#include <optional>
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

// A compiled module-name regex (PCRE2, gptq_config.cpp); shared between copies of a config.
class gptq_module_regex;

// One entry of GPTQModel's `dynamic` object: a key "<prefix><regex>" matched against a module's
// full name ("model.layers.3.mlp.down_proj", "lm_head") from its first character (Python's
// re.match: anchored at the start, not at the end). Prefix "-:": matching modules are left
// unquantized (dense .weight). Prefix "+:" or none: the rule's fields replace the base config's
// for matching modules. Rules are tried in file order; the first that matches decides.
struct gptq_dynamic_rule {
    std::string                              key;           // as written in the file, prefix included
    std::string                              pattern;       // the regex, prefix removed
    bool                                     skip = false;  // "-:"
    std::optional<int>                       bits;          // overrides ("+:"): absent fields keep the base value
    std::optional<int>                       group_size;
    std::optional<bool>                      desc_act;
    std::optional<bool>                      sym;
    std::shared_ptr<const gptq_module_regex> regex;

    bool matches(const std::string& module) const;
};

struct gptq_config {
    std::string                    source;  // file it came from (and key, for config.json)
    int                            bits            = 4;
    int                            group_size      = 128;  // -1: one group per row
    bool                           desc_act        = false;
    bool                           sym             = true;
    bool                           static_groups   = false;
    bool                           true_sequential = true;
    double                         damp_percent    = 0.01;
    bool                           lm_head         = false;
    gptq_checkpoint_format         format          = gptq_checkpoint_format::GPTQ_FORMAT_V1;
    std::string                    quant_method    = "gptq";
    std::string                    pack_dtype      = "int32";
    std::string                    model_file_base_name;  // "" when absent or null
    std::vector<std::string>       quantizer;             // meta.quantizer, e.g. "gptqmodel:4.0.0"
    std::vector<gptq_dynamic_rule> dynamic;               // GPTQModel per-module rules, in file order
    json                           raw;                   // the object as read

    // The dict we write (both files), format.md 1.7 "minimal robust set", and `dynamic` when there are
    // rules (nlohmann's json sorts its keys: rules we write must not depend on their order).
    json to_json() const;

    // The rule of `dynamic` that decides `module` (the first that matches), or nullptr.
    const gptq_dynamic_rule* dynamic_rule_for(const std::string& module) const;
    // The settings `module` was quantized with: nullopt when a "-:" rule leaves it unquantized,
    // else this config with the first matching "+:" rule's fields applied (source then names the
    // rule). `dynamic` is empty in the returned copy.
    std::optional<gptq_config> for_module(const std::string& module) const;
};

// Parse a quantization config object. Checks bits in {2,3,4,8}, group_size -1 or positive,
// damp_percent in (0,1), quant_method "gptq", pack_dtype "int32", and every `dynamic` rule (a
// regex that compiles, override values under the same rules). nlohmann's json keeps object keys
// sorted, so `dynamic_order` gives the rules' file order (gptq_config_read finds it); empty: the
// object's own (sorted) order.
result<gptq_config> gptq_config_parse(const json& j, const std::string& where,
                                      const std::vector<std::string>& dynamic_order = {});

// Read the GPTQ config of one file: the whole object of quantize_config.json / quant_config.json
// (key == nullptr) or config.json's `key` object ("quantization_config"). NOT_FOUND when the file
// or the key is absent (or null); `dynamic` rules keep the file's order.
result<gptq_config> gptq_config_read(const std::string& path, const char* key = nullptr);

// Find and parse the GPTQ config of a checkpoint folder: quantize_config.json, quant_config.json,
// then config.json quantization_config. Returns NOT_FOUND when the folder has none.
result<gptq_config> gptq_config_find(const std::string& folder);

}  // namespace gptq
