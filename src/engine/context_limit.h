// The context checks of ppl and generate (issue 15): how many positions a model takes.
#pragma once

#include <cstdint>

#include "model/llama.h"

namespace gptq {

// config.json's max_position_embeddings; 0 (no limit) for dynamic NTK RoPE, which rescales its
// frequencies to run past it (transformers' "dynamic" rope_type).
inline int64_t model_context_limit(const llama_hparams& hp) {
    return hp.rope.type == rope_type::ROPE_DYNAMIC ? 0 : hp.max_position_embeddings;
}

}  // namespace gptq
