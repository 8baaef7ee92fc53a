#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "core/status.h"

namespace gptq {

const char* status_code_name(status_code code) {
    switch (code) {
        case status_code::STATUS_OK:
            return "ok";
        case status_code::STATUS_INVALID_ARGUMENT:
            return "invalid argument";
        case status_code::STATUS_IO_ERROR:
            return "i/o error";
        case status_code::STATUS_PARSE_ERROR:
            return "parse error";
        case status_code::STATUS_UNSUPPORTED:
            return "unsupported";
        case status_code::STATUS_NOT_FOUND:
            return "not found";
        case status_code::STATUS_OUT_OF_MEMORY:
            return "out of memory";
        case status_code::STATUS_CANCELLED:
            return "cancelled";
        case status_code::STATUS_INTERNAL:
            return "internal error";
    }
    return "unknown";
}

void assert_fail(const char* expr, const char* file, int line, const char* msg) {
    std::fprintf(stderr, "gptq: internal error: assertion '%s' failed at %s:%d%s%s\n", expr, file, line,
                 msg ? ": " : "", msg ? msg : "");
    std::fflush(stderr);
    std::abort();
}

}  // namespace gptq
