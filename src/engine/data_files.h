// Locating the data bundled with gptqkit (data/...) and reading text files.
#pragma once

#include <string>

#include "core/status.h"

namespace gptq {

// A file under the repository's data/ folder: looked up next to the executable (bin/../data,
// build/bin/../../data) and then in the source tree this binary was built from.
result<std::string> bundled_data_resolve(const std::string& rel_path);

result<std::string> text_file_read(const std::string& path);

}  // namespace gptq
