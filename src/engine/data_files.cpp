// bundled_data_resolve (data_files.h): where the files under data/ (and the bundled model's
// tokenizer) are found, from the running executable's location.
#include "data_files.h"

#include <filesystem>
#include <vector>

#include "core/error.h"
#include "io/json_file.h"

#ifndef GPTQ_SOURCE_DIR
#define GPTQ_SOURCE_DIR ""
#endif

namespace gptq {

namespace fs = std::filesystem;

namespace {
constexpr const char* k_install_data_dir = "share/gptqkit";  // CMakeLists.txt's install(DIRECTORY ...)
}  // namespace

result<std::string> bundled_data_resolve(const std::string& rel_path) {
    std::vector<fs::path> tried;
    std::error_code       ec;
    const fs::path        exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
        // Installed (cmake --install): PREFIX/bin/gptq and PREFIX/share/gptqkit/data/...; the build
        // tree: build/bin/gptq beside the source's data/.
        tried.push_back(exe.parent_path() / ".." / k_install_data_dir / rel_path);
        tried.push_back(exe.parent_path() / ".." / rel_path);
        tried.push_back(exe.parent_path() / ".." / ".." / rel_path);
    }
    if (std::string(GPTQ_SOURCE_DIR).size() > 0) tried.push_back(fs::path(GPTQ_SOURCE_DIR) / rel_path);
    std::string list;
    for (const auto& p : tried) {
        if (fs::is_regular_file(p)) return fs::weakly_canonical(p).string();
        list += (list.empty() ? "" : ", ") + p.lexically_normal().string();
    }
    return make_error(status_code::STATUS_NOT_FOUND, "bundled file {} not found (looked in: {})", rel_path, list);
}

result<std::string> text_file_read(const std::string& path) {
    return file_read_all(path);
}

}  // namespace gptq
