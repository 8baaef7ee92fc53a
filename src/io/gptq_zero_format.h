// Which zero-point format a GPTQ checkpoint really uses, decided from its data (format.md 1.4).
//
// v1 ("gptq") stores zero - 1 in qzeros, v2 ("gptq_v2") stores zero. The config's
// checkpoint_format is not always right: checkpoints exist that hold v2 zeros under a v1 label and
// the reverse, and reading them with the wrong format gives garbage with no error. The data tells:
//   - symmetric checkpoints: every stored field is 2^(b-1) - 1 in v1 and 2^(b-1) in v2;
//   - asymmetric ones: min-max quantization of roughly zero-mean weights puts the mean code of a
//     group close to its zero point, so the mean over (group, column) of (mean code - stored field)
//     is ~0 in v2 and ~1 in v1 (stored = zero - 1). Fields at 2^b - 1 are left out of that mean
//     (in v1 they are a zero of 0 wrapped around); they are counted as `n_wrap` when the group's
//     codes sit low, as a wrapped zero of 0 would have them.
// docs/io.md ("Zero-point format") gives the thresholds and the values measured on real models.
//
// One decision per checkpoint: loading (model/llama.cpp), `gptq convert` and `gptq inspect` all
// call gptq_zero_format_detect / _resolve.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/gptq_config.h"
#include "io/tensor_source.h"

namespace gptq {

// A quantized module found by its tensors (<name>.qweight / .qzeros / .scales / .g_idx, all I32
// but scales), with the sizes its tensors imply: K = g_idx length, N = scales columns, G = scales
// rows, bits = qweight rows * 32 / K. Modules whose tensors do not fit together are left out
// (loading reports them).
struct gptq_module_desc {
    std::string name;  // "model.layers.0.self_attn.q_proj"
    int64_t     n_out = 0, n_in = 0, n_groups = 0;
    int         bits = 0;
};
std::vector<gptq_module_desc> gptq_modules_list(const tensor_source& src);

// Thresholds of the asymmetric statistic (see docs/io.md for the measured values). Modules looked
// at: k_zero_sample_modules spread over the checkpoint, all of them when those leave the
// statistic too imprecise.
constexpr double  k_zero_offset_v1_min  = 0.7;   // mean (code - field) at or above: v1
constexpr double  k_zero_offset_v2_max  = 0.3;   // at or below: v2; between: ambiguous
constexpr double  k_zero_max_se         = 0.1;   // standard error of that mean above which: ambiguous
constexpr int64_t k_zero_min_pairs      = 256;   // (group, column) pairs needed to decide
constexpr int     k_zero_sample_modules = 8;     // modules looked at first
constexpr int64_t k_zero_sample_rows    = 1024;  // input rows of each module's codes looked at
constexpr int64_t k_zero_sample_cols    = 512;   // and output columns

struct gptq_zero_format_evidence {
    gptq_checkpoint_format label    = gptq_checkpoint_format::GPTQ_FORMAT_V1;  // the config's
    gptq_checkpoint_format format   = gptq_checkpoint_format::GPTQ_FORMAT_V1;  // what to read with
    bool                   decided  = false;  // the data decided `format` (else: the label)
    bool                   mismatch = false;  // decided, and not what the label says
    std::string            basis;             // one line: what the data shows
    // What was looked at.
    int64_t n_modules = 0, n_fields = 0;
    int64_t n_sym_v1 = 0, n_sym_v2 = 0;  // fields equal to 2^(b-1) - 1 / 2^(b-1)
    int64_t n_pairs     = 0;             // (group, column) pairs in the asymmetric statistic
    double  mean_offset = 0.0;           // their mean of (mean code - stored field)
    double  offset_se   = 0.0;           // its standard error
    int64_t n_top = 0, n_wrap = 0;       // fields at 2^b - 1 (left out); those with low codes
};

// Decide from the data. Marlin checkpoints (no qzeros) and checkpoints without quantized modules
// keep their label (decided = false). Errors only for unreadable tensors.
result<gptq_zero_format_evidence> gptq_zero_format_detect(const tensor_source& src, const gptq_config& cfg);

// detect, then set cfg->format to what the data says. A label that disagrees is a warning naming
// the config file, the label and the data's format, printed once per checkpoint folder in the
// process however often it is opened.
result<gptq_zero_format_evidence> gptq_zero_format_resolve(const tensor_source& src, gptq_config* cfg);

// The warning text of a mismatch (also what `gptq inspect --check` can list).
std::string gptq_zero_format_message(const gptq_zero_format_evidence& ev, const gptq_config& cfg);

}  // namespace gptq
