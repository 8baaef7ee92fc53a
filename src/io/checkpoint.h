// The checkpoint detector: one decision, used by every command, of which files hold a model's
// weights, whether it is GPTQ-quantized, and with which settings for each module.
//
// Weights (checkpoint_weights_locate, which tensor_source::open follows): a .safetensors path is
// read as it is; in a folder, the GPTQ config's model_file_base_name (<base>.safetensors, then
// <base>.safetensors.index.json), then model.safetensors.index.json, then model.safetensors,
// then the folder's only *.safetensors file.
//
// GPTQ settings (checkpoint_detect): quantize_config.json, quant_config.json and config.json's
// quantization_config, all read; the first present is the base, and where two files disagree the
// tensors decide (bits, group_size, desc_act), with a warning naming both files and values.
// GPTQModel's `dynamic` rules give each module its own settings (gptq_config::for_module). Every
// quantized module's tensors are then read for what they say on their own (bits from qzeros,
// groups from scales, group size and act-order from g_idx; format.md 1.2) and a config that
// disagrees is an error naming the file, the field, the config's value and the tensors'.
// docs/io.md "The checkpoint detector" lists the rules.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "io/gptq_config.h"
#include "io/tensor_source.h"

namespace gptq {

enum class checkpoint_finding_level : uint8_t { FINDING_WARNING, FINDING_ERROR };
const char* checkpoint_finding_level_name(checkpoint_finding_level l);  // "warning", "error"

// Something the detector noticed. Errors make checkpoint_info::check() fail; `gptq inspect
// --check` lists them all.
struct checkpoint_finding {
    checkpoint_finding_level level = checkpoint_finding_level::FINDING_WARNING;
    std::string              code;     // kind, for tests and JSON: "config_files_disagree", "config_vs_tensors", ...
    std::string              message;  // names the files, the field and the values
};

// Which files hold the weights.
struct checkpoint_weights {
    std::string path;    // as given
    std::string folder;  // folder holding the files (and the configs)
    std::string index;   // the shard index read, or ""
    std::string file;    // the single .safetensors file read, or "" (sharded)
    std::string reason;  // why these, for messages ("model_file_base_name 'x' of quantize_config.json")
    std::vector<checkpoint_finding> findings;  // e.g. other .safetensors files in the folder, not read
};

// The weights of `path` (a folder or a .safetensors file). Errors: no weights (naming what was
// looked for; a folder with only pickle .bin files says so), several .safetensors files and
// nothing saying which, a model_file_base_name that is not a plain file name, an unfinished
// quantize work folder (work_folder_check).
result<checkpoint_weights> checkpoint_weights_locate(const std::string& path);

// What one quantized module's tensors say, without any config (format.md 1.2): qweight
// I32 [K*b/32, N], qzeros I32 [G, N*b/32], scales [G, N], g_idx I32 [K].
struct gptq_module_tensors {
    std::string module;
    std::string file;                // holding <module>.qweight
    int64_t     n_in       = 0;      // K = len(g_idx)
    int64_t     n_out      = 0;      // N = qweight columns
    int64_t     n_groups   = 0;      // G = scales rows
    int         bits       = 0;      // 32 * qzeros columns / N
    int         group_size = 0;      // the columns of each group in g_idx; -1 when G == 1
    bool        act_order  = false;  // g_idx[k] != k / group_size somewhere
};
// Errors name the file, the tensor and the values that do not fit together.
result<gptq_module_tensors> gptq_module_tensors_read(const tensor_source& src, const std::string& module);

// Whether a config's group_size describes `t`'s groups: ceil(K / group_size) groups (one when
// -1), and, with more than one group, exactly the group size g_idx shows.
bool gptq_group_size_fits(int group_size, const gptq_module_tensors& t);

// One GPTQ config file of a folder (precedence order: quantize_config.json, quant_config.json,
// config.json quantization_config). A present file that does not parse is an error.
struct gptq_config_file {
    std::string label;  // "quantize_config.json", "config.json quantization_config"
    gptq_config config;
};
result<std::vector<gptq_config_file>> gptq_config_files_read(const std::string& folder);

struct checkpoint_detect_options {
    // false: a folder without weights (only config.json / quantize_config.json, as `gptq plan`
    // takes) gives the settings from the config files alone (source stays null).
    bool need_weights = true;
};

struct checkpoint_info {
    checkpoint_weights             weights;
    std::unique_ptr<tensor_source> source;  // opened on `weights`; null only without need_weights
    // The GPTQ settings, or nullopt for an unquantized checkpoint. Fields the config files
    // disagreed on hold the value the tensors confirmed.
    std::optional<gptq_config>                              gptq;
    std::vector<std::string>                                gptq_files;  // config files read, precedence order
    std::map<std::string, gptq_config, std::less<>>         modules;     // each quantized module -> its settings
    std::map<std::string, gptq_module_tensors, std::less<>> tensors;     // each quantized module -> its tensors
    std::vector<checkpoint_finding>                         findings;

    bool has_errors() const;
    // OK, or STATUS_PARSE_ERROR carrying the first error (and how many more, pointing to
    // `gptq inspect --check`).
    status check() const;
    // Log every warning (GPTQ_LOG_WARN); commands call it once after check().
    void log_warnings() const;
    // The settings of `module` ("model.layers.0.self_attn.q_proj", "lm_head") when its tensors are
    // GPTQ (.qweight), else nullptr (a dense module, or an unquantized checkpoint).
    const gptq_config* module_config(std::string_view module) const;
};

// Detect `path` (a folder or a .safetensors file). Unreadable or malformed files are errors;
// disagreements between configs and tensors are findings (check() turns errors into a status).
result<checkpoint_info> checkpoint_detect(const std::string& path, const checkpoint_detect_options& options = {});

}  // namespace gptq
