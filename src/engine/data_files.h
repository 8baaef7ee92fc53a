// Locating the data bundled with gptqkit (data/...) and reading text files.
#pragma once

#include <string>

#include "core/status.h"

namespace gptq {

// A file under the repository's data/ (or models/) folder: looked up relative to the executable
// (installed: bin/../share/gptqkit/REL; build tree: bin/../REL, build/bin/../../REL) and then in
// the source tree this binary was built from. The error lists the places tried.
result<std::string> bundled_data_resolve(const std::string& rel_path);

result<std::string> text_file_read(const std::string& path);

}  // namespace gptq
