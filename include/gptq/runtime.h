// Process-wide settings the CLI applies once: log level, progress output, version.
#pragma once

#include <string>

namespace gptq {

enum class verbosity { VERBOSITY_QUIET, VERBOSITY_NORMAL, VERBOSITY_DEBUG };

// quiet: warnings and errors only, no progress bars; debug: debug log lines too.
void set_verbosity(verbosity v);

std::string version_string();  // "gptqkit 0.1.0 (CUDA: yes)"

}  // namespace gptq
