// Scratch files and input splitting for the fuzz entry points (fuzz_common.h), and the table of
// entry points (fuzz_targets.h).
#include "fuzz_common.h"

#include "fuzz_targets.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

namespace gptq::fuzz {

namespace fs = std::filesystem;

std::vector<input_part> split_parts(const uint8_t* data, size_t size) {
    const std::string_view  all(reinterpret_cast<const char*>(data), size);
    std::vector<input_part> parts;
    size_t                  pos = 0;
    while (pos <= all.size() && parts.size() < 16) {
        size_t end = all.find(k_part_separator, pos);
        if (end == std::string_view::npos) end = all.size();
        const std::string_view chunk = all.substr(pos, end - pos);
        const size_t           nl    = chunk.find('\n');
        input_part             p;
        const std::string_view raw_name = nl == std::string_view::npos ? chunk : chunk.substr(0, nl);
        for (char c : raw_name.substr(0, 64))
            if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                c == '-')
                p.name += c;
        if (p.name.empty() || p.name == "." || p.name == "..") p.name = "part" + std::to_string(parts.size());
        p.bytes = nl == std::string_view::npos ? std::string_view() : chunk.substr(nl + 1);
        parts.push_back(p);
        if (end == all.size()) break;
        pos = end + k_part_separator.size();
    }
    return parts;
}

namespace {
void remove_scratch() {
    std::error_code ec;
    fs::remove_all(scratch_dir(), ec);
}
}  // namespace

const std::string& scratch_dir() {
    // Never destroyed: remove_scratch runs at exit, after function-local statics are gone.
    static const std::string* dir = [] {
        const char* tmp = std::getenv("TMPDIR");
        auto* d = new std::string(std::string(tmp && *tmp ? tmp : "/tmp") + "/gptq-fuzz-" + std::to_string(getpid()));
        fs::create_directories(*d);
        std::atexit(remove_scratch);
        return d;
    }();
    return *dir;
}

void scratch_clear() {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(scratch_dir(), ec)) fs::remove_all(e.path(), ec);
}

std::string scratch_file(const std::string& name) {
    return scratch_dir() + "/" + name;
}

void write_bytes(const std::string& path, std::string_view bytes) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || (bytes.size() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) || std::fclose(f) != 0) {
        std::perror(path.c_str());
        std::abort();
    }
}

std::string source_path(const std::string& rel) {
    return std::string(GPTQ_SOURCE_DIR) + "/" + rel;
}

const std::vector<fuzz_target>& fuzz_targets() {
    static const std::vector<fuzz_target> t = {
        {"safetensors", fuzz_safetensors},
        {"tensor_source", fuzz_tensor_source},
        {"config", fuzz_config},
        {"tokenizer_json", fuzz_tokenizer_json},
        {"tokenizer_text", fuzz_tokenizer_text},
        {"gptq_module", fuzz_gptq_module},
        {"chat_template", fuzz_chat_template},
        {"device_map", fuzz_device_map},
        {"serve_request", fuzz_serve_request},
    };
    return t;
}

}  // namespace gptq::fuzz
