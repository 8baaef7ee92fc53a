// The ids that end a generated sequence, as transformers' generate() takes them: the generation
// config's eos_token_id (an int or a list), which falls back on config.json's, else the
// tokenizer's EOS. Ids outside the vocabulary are dropped. Used by generate and serve.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "io/hf_config.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

inline std::vector<int32_t> generation_eos_ids(const generation_config& gc, const model_config& cfg, int64_t n_vocab,
                                               const tokenizer& tok) {
    const std::vector<int64_t>& ids = gc.eos_token_ids.empty() ? cfg.eos_token_ids : gc.eos_token_ids;
    if (ids.empty()) return tok.eos_ids();
    std::vector<int32_t> out;
    for (int64_t id : ids)
        if (id >= 0 && id < n_vocab && std::find(out.begin(), out.end(), static_cast<int32_t>(id)) == out.end())
            out.push_back(static_cast<int32_t>(id));
    return out;
}

}  // namespace gptq
