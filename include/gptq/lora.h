// LoRA adapters (PEFT's format) at inference and merged into an FP16 model. docs/lora.md.
//
// `--lora DIR[:SCALE]` on ppl, generate, bench and serve: the adapter folder (adapter_config.json +
// adapter_model.safetensors) and a multiplier of its own scale (lora_alpha / r). ppl, generate and
// bench apply every adapter given, summed; serve loads each as a model clients choose by name.
#pragma once

#include <string>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct lora_spec {
    std::string path;         // the adapter folder
    double      scale = 1.0;  // multiplies lora_alpha / r
};

// "DIR" or "DIR:SCALE" (SCALE a finite number; a DIR holding ':' is taken whole when what follows
// the last ':' is not a number). Errors quote the argument.
result<lora_spec> lora_spec_parse(const std::string& arg);

// gptq merge-lora BASE LORA... -o OUT: a copy of the FP16/BF16/F32 model BASE (config, tokenizer,
// generation config) whose adapted linears hold W + scale * B A (computed in F32, stored in the
// base's dtype). A GPTQ base is refused (merge into its FP16 original, then quantize).
struct merge_lora_params {
    std::string            base_path;
    std::vector<lora_spec> loras;
    std::string            out_path;
};
status merge_lora_run(const merge_lora_params& params);

}  // namespace gptq
