// Fuzz entry point for the chat-template engine (src/engine/jinja.cpp): the template comes from a
// downloaded tokenizer_config.json, so it is hostile input like any file.
#include <string>
#include <vector>

#include "fuzz_targets.h"
#include "gptq/chat.h"

namespace gptq::fuzz {

int fuzz_chat_template(const uint8_t* data, size_t size) {
    const std::string               tmpl(reinterpret_cast<const char*>(data), size);
    const std::vector<chat_message> msgs = {
        {"system", "Be brief."}, {"user", "hi {{ x }}"}, {"assistant", "Hello."}, {"user", "2 + 2?"}};
    for (const bool gen : {true, false}) {
        auto r = chat_template_render(tmpl, msgs, {"<s>", "</s>", gen});
        // Either outcome is fine; an error must say something.
        if (!r.is_ok() && r.error().message().empty()) __builtin_trap();
    }
    return 0;
}

}  // namespace gptq::fuzz
