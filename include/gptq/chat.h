// Chat templates: the Jinja template of a model's tokenizer_config.json ("chat_template") rendered
// for a list of messages, as transformers' apply_chat_template does (trim_blocks, lstrip_blocks).
// The engine implements the Jinja subset these templates use (src/engine/jinja.cpp; the list is in
// docs/generate.md): Llama-2, Llama-3/3.1, Mistral and Qwen2/2.5 render; anything outside the
// subset is an error naming the construct ("chat template: unsupported tag 'macro' at line 3").
#pragma once

#include <string>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct chat_message {
    std::string role;  // "system", "user", "assistant"
    std::string content;
};

struct chat_template_vars {
    std::string bos_token;  // the tokenizer's BOS / EOS strings ("<s>", "</s>"), as transformers passes them
    std::string eos_token;
    bool        add_generation_prompt = true;  // end with the assistant header the model continues from
};

result<std::string> chat_template_render(const std::string& tmpl, const std::vector<chat_message>& messages,
                                         const chat_template_vars& vars);

// The template of a --chat-template FILE (serve, finetune): the file's text, or the string
// "chat_template" of a .json file (a tokenizer_config.json). Errors name the option and the file.
result<std::string> chat_template_file_read(const std::string& path);

}  // namespace gptq
