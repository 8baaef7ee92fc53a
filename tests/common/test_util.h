// Helpers shared by tests: temporary folders, file writing, running the gptq binary.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace gptq::test {

// A fresh folder under the build tree, removed when the object dies.
class temp_dir {
public:
    explicit temp_dir(const std::string& tag) {
        static int counter = 0;
        path_              = std::filesystem::path(GPTQ_BINARY_DIR) / "test-tmp" /
                (tag + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
        std::filesystem::remove_all(path_);
        std::filesystem::create_directories(path_);
    }
    ~temp_dir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    std::string path() const { return path_.string(); }
    std::string file(const std::string& name) const { return (path_ / name).string(); }

private:
    std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

struct run_result {
    int         exit_code = -1;
    std::string out;  // stdout
    std::string err;  // stderr
};

// Run a shell command, capturing stdout and stderr separately.
inline run_result run_command(const std::string& cmd) {
    static int  counter = 0;
    std::string err_file =
        std::string(GPTQ_BINARY_DIR) + "/test-tmp/stderr-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    std::filesystem::create_directories(std::string(GPTQ_BINARY_DIR) + "/test-tmp");
    run_result r;
    FILE*      p = popen((cmd + " 2>" + err_file).c_str(), "r");
    if (!p) return r;
    std::array<char, 4096> buf;
    size_t                 n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int st = pclose(p);
    r.exit_code  = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    r.err        = read_file(err_file);
    std::filesystem::remove(err_file);
    return r;
}

inline std::string gptq_binary() {
    return std::string(GPTQ_BINARY_DIR) + "/bin/gptq";
}
inline std::string source_path(const std::string& rel) {
    return std::string(GPTQ_SOURCE_DIR) + "/" + rel;
}
// ../shared beside the checkout: present in CI, absent in a user's clone.
inline std::string shared_path(const std::string& rel) {
    return std::string(GPTQ_SOURCE_DIR) + "/../shared/" + rel;
}
inline bool shared_available() {
    return std::filesystem::exists(shared_path("models"));
}

}  // namespace gptq::test
