// Internal: the three tokenizer back ends and the shared finishing step of tokenizer::load.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "core/status.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

// tokenizer.json, already parsed. `where` names the file for messages.
result<std::unique_ptr<tokenizer>> hf_tokenizer_from_json(const nlohmann::json& j, const std::string& where);

// GPT-2 vocab.json + merges.txt: byte-level BPE (add_prefix_space=false, GPT-2 split regex),
// ByteLevel decoder, no post-processing; "<|endoftext|>" is a special token when in the vocab.
result<std::unique_ptr<tokenizer>> hf_tokenizer_from_gpt2_files(const std::string& vocab_path,
                                                                const std::string& merges_path);

// A SentencePiece tokenizer.model through libsentencepiece. add_bos/add_eos: what encode(text,
// true) adds.
result<std::unique_ptr<tokenizer>> spm_tokenizer_load(const std::string& model_path, bool add_bos, bool add_eos);

// Reading helpers shared by the loaders.
result<std::string>    tokenizer_read_file(const std::string& path);
result<nlohmann::json> tokenizer_read_json(const std::string& path, const std::string& where);

}  // namespace gptq
