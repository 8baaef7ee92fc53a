// The adapters a model_session or merge-lora loads from --lora arguments (engine/lora.cpp).
#pragma once

#include <memory>
#include <vector>

#include "gptq/lora.h"
#include "model/llama.h"
#include "model/lora.h"

namespace gptq {

// Each spec read for hp (lora_adapter_load); stack: one adapter summing them all (ppl, generate,
// bench, merge-lora), else one per spec (serve), whose names (folder names) must differ.
result<std::vector<std::shared_ptr<const lora_adapter>>> lora_adapters_open(const std::vector<lora_spec>& specs,
                                                                            const llama_hparams& hp, bool stack);

}  // namespace gptq
