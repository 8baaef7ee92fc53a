// Building error statuses with formatted messages, and GPTQ_ASSERT for internal invariants.
#pragma once

#include <fmt/format.h>

#include "core/status.h"

namespace gptq {

template <typename... Args>
status make_error(status_code code, fmt::format_string<Args...> f, Args&&... args) {
    return status(code, fmt::format(f, std::forward<Args>(args)...));
}

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* msg);

}  // namespace gptq

// A broken internal invariant: print file:line and abort. Never for bad user input.
#define GPTQ_ASSERT(cond)                                                     \
    do {                                                                      \
        if (!(cond)) ::gptq::assert_fail(#cond, __FILE__, __LINE__, nullptr); \
    } while (0)
#define GPTQ_ASSERT_MSG(cond, msg)                                          \
    do {                                                                    \
        if (!(cond)) ::gptq::assert_fail(#cond, __FILE__, __LINE__, (msg)); \
    } while (0)
