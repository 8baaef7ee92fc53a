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
    std::string              source;        // file (and key) the config came from
    std::vector<std::string> config_files;  // every GPTQ config file present, precedence order
    // bits, group_size and desc_act as the tensors have them (the most common over the quantized
    // modules; desc_act: any module in act-order); the rest from the config.
    int                        bits          = 0;
    int                        group_size    = 0;
    bool                       desc_act      = false;
    bool                       sym           = true;
    bool                       static_groups = false;
    double                     damp_percent  = 0.0;
    std::string                checkpoint_format;        // "gptq", "gptq_v2", "marlin"
    bool                       lm_head         = false;  // lm_head is quantized
    int                        n_dynamic_rules = 0;      // GPTQModel `dynamic` entries
    std::vector<std::string>   quantized_modules;        // module paths with a .qweight
    std::map<std::string, int> module_kinds;             // "4-bit g128", "8-bit g32 act-order" -> modules
};

// Something the checkpoint detector noticed (io/checkpoint.h): a warning, or an error that makes
// every other command refuse the checkpoint.
struct inspect_finding {
    std::string level;  // "warning" or "error"
    std::string code;   // "config_files_disagree", "config_vs_tensors", "weights_file_ignored", ...
    std::string message;
};

struct inspect_options {
    // List every finding instead of failing at the first error (`gptq inspect --check`).
    bool check = false;
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
    std::string                    weights_reason;  // why these files: "model.safetensors", "model_file_base_name ..."
    std::vector<inspect_finding>   findings;
    bool                           has_errors = false;  // an error finding (only with options.check)
};

// Read a model folder (config.json + safetensors) or a single .safetensors file. Fails with a
// message naming the file and value on any malformed or unsupported input, and on a GPTQ config
// that disagrees with the tensors (with options.check such findings are reported instead).
result<inspect_report> inspect_model(const std::string& path, const inspect_options& options = {});

// The findings alone (`gptq inspect --check`): one line each and a summary line; JSON: {"path",
// "findings": [{"level", "code", "message"}], "n_errors", "n_warnings"}.
std::string inspect_findings_text(const inspect_report& report);
std::string inspect_findings_json(const inspect_report& report);

// The report as JSON text (one object); per-tensor table included when `with_tensors`.
std::string inspect_report_json(const inspect_report& report, bool with_tensors);

// The report as human-readable text.
std::string inspect_report_text(const inspect_report& report, bool with_tensors);

}  // namespace gptq
