#include "gptq/runtime.h"

#include "core/log.h"
#include "core/progress.h"

#ifndef GPTQKIT_VERSION
#define GPTQKIT_VERSION "0.1.0"
#endif

namespace gptq {

void set_verbosity(verbosity v) {
    switch (v) {
        case verbosity::VERBOSITY_QUIET:
            log_set_level(log_level::LOG_WARN);
            progress_set_quiet(true);
            break;
        case verbosity::VERBOSITY_NORMAL:
            log_set_level(log_level::LOG_INFO);
            progress_set_quiet(false);
            break;
        case verbosity::VERBOSITY_DEBUG:
            log_set_level(log_level::LOG_DEBUG);
            progress_set_quiet(false);
            break;
    }
}

std::string version_string() {
#ifdef GPTQ_HAVE_CUDA
    return std::string("gptqkit ") + GPTQKIT_VERSION + " (CUDA: yes)";
#else
    return std::string("gptqkit ") + GPTQKIT_VERSION + " (CUDA: no)";
#endif
}

}  // namespace gptq
