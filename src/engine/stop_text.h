// The text of one generated sequence as it grows: decoded pieces go in, the part that is final
// comes out (never a possible beginning of a stop string, never half a UTF-8 character), and the
// text ends before the first stop string that appears. The one implementation of that rule, for
// generate (generate.cpp) and serve (serve_scheduler.cpp).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace gptq {

class stop_text {
public:
    explicit stop_text(std::vector<std::string> stop);

    // Append decoded text. Returns the text that became final. final: nothing more will come, so
    // nothing is held back. After a stop string, stopped() is true and later pushes return "".
    std::string push(std::string_view piece, bool final = false);

    bool               stopped() const { return stopped_; }
    const std::string& text() const { return text_; }  // everything so far (cut at a stop string)

private:
    std::vector<std::string> stop_;
    size_t                   max_stop_ = 0;
    std::string              text_;
    size_t                   emitted_ = 0;  // bytes of text_ already returned
    bool                     stopped_ = false;
};

}  // namespace gptq
