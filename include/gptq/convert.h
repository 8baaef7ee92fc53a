// gptq convert: rewrite a GPTQ checkpoint's zero points in the other format, v1 ("gptq": stored
// zero - 1, what every reader takes) or v2 ("gptq_v2": stored zero, GPTQModel's), format.md 1.4.
//
// The input's zero-point format is decided from its data (a wrong checkpoint_format label is
// corrected, with a warning), so converting to the format the data already has only fixes the
// label. Every quantized module's qzeros are rewritten in place in a byte copy of its shard (the
// rest of each file, its header and tensor order, stays byte for byte), both config files get the
// new checkpoint_format (and format, where present), every other file is copied. The output is
// built in a temporary folder beside it and renamed at the end: an interrupted or failed run never
// leaves a folder under the output name (docs/quantize.md, "Converting").
#pragma once

#include <cstdint>
#include <string>

#include "gptq/status.h"

namespace gptq {

struct convert_params {
    std::string input_path;     // GPTQ checkpoint folder
    std::string output_path;    // folder to create
    std::string format;         // "gptq" (v1) or "gptq_v2"
    bool        force = false;  // replace an existing output folder (only once the new one is complete)
    // v1 output only: a zero point of 0 (which v1 cannot store) becomes 1 and the codes of its group
    // and column move up by one, so that every weight keeps its value except those whose code is
    // already 2^bits - 1 (they lose one scale step). Without it such a checkpoint is refused.
    bool clamp_zeros = false;
};

struct convert_report {
    std::string output_path;
    std::string label_in;   // the input config's checkpoint_format
    std::string format_in;  // what its zero points are (the data decides; else the label)
    std::string basis;      // why (one line)
    std::string format_out;
    int64_t     n_modules       = 0;  // quantized modules rewritten
    int64_t     n_files         = 0;  // safetensors files
    int64_t     n_zeros_clamped = 0;  // zero points 0 stored as 1 (clamp_zeros)
    int64_t     n_codes_changed = 0;  // weights whose value that changed (codes at 2^bits - 1)
};

result<convert_report> convert_checkpoint(const convert_params& params);

std::string convert_report_summary(const convert_report& r);  // the lines the CLI prints

}  // namespace gptq
