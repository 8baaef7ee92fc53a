// Inspecting a model folder or a .safetensors file: architecture, sizes, dtypes, GPTQ settings.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct inspect_tensor {
    std::string          name;
    std::string          dtype;  // safetensors spelling: "F16"
    std::vector<int64_t> shape;
    uint64_t             n_bytes = 0;
    std::string          file;  // shard file name
};

struct inspect_quantization {
    bool                     present = false;
    std::string              source;  // file (and key) the config came from
    int                      bits          = 0;
    int                      group_size    = 0;
    bool                     desc_act      = false;
    bool                     sym           = true;
    bool                     static_groups = false;
    double                   damp_percent  = 0.0;
    std::string              checkpoint_format;  // "gptq", "gptq_v2", "marlin"
    std::vector<std::string> quantized_modules;  // module paths with a .qweight
};

struct inspect_report {
    std::string                    path;
    bool                           has_config = false;  // config.json found and parsed
    std::string                    architecture;        // "LlamaForCausalLM"
    std::string                    model_type;          // "llama"
    std::string                    dtype;               // config dtype ("float16"), else the most common tensor dtype
    int64_t                        n_params          = 0;  // logical parameters (a GPTQ linear counts as in x out)
    int64_t                        n_layers          = 0;
    int64_t                        hidden_size       = 0;
    int64_t                        intermediate_size = 0;
    int64_t                        n_heads           = 0;
    int64_t                        n_kv_heads        = 0;
    int64_t                        head_dim          = 0;
    int64_t                        vocab_size        = 0;
    int64_t                        max_position_embeddings = 0;
    double                         rope_theta              = 0.0;
    std::string                    rope_type;
    bool                           tie_word_embeddings = false;
    std::map<std::string, int64_t> params_by_dtype;    // stored elements per dtype
    uint64_t                       bytes_on_disk = 0;  // sum of .safetensors file sizes
    int                            n_files       = 0;
    int64_t                        n_tensors     = 0;
    std::vector<inspect_tensor>    tensors;  // sorted by name
    inspect_quantization           quantization;
};

// Read a model folder (config.json + safetensors) or a single .safetensors file. Fails with a
// message naming the file and value on any malformed or unsupported input.
result<inspect_report> inspect_model(const std::string& path);

// The report as JSON text (one object); per-tensor table included when `with_tensors`.
std::string inspect_report_json(const inspect_report& report, bool with_tensors);

// The report as human-readable text.
std::string inspect_report_text(const inspect_report& report, bool with_tensors);

}  // namespace gptq
