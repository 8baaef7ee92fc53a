#include "host_memory.h"

#include <fmt/format.h>

#include <cstdlib>
#include <fstream>

#include "core/error.h"

namespace gptq {

uint64_t host_memory_available() {
    if (const char* lim = std::getenv("GPTQ_MEMORY_LIMIT_BYTES"); lim && *lim) return std::strtoull(lim, nullptr, 10);
    std::ifstream in("/proc/meminfo");
    std::string   key, unit;
    uint64_t      kb = 0;
    while (in >> key >> kb >> unit)
        if (key == "MemAvailable:") return kb * 1024;
    return 0;
}

std::string human_bytes(uint64_t n) {
    if (n >= (1ull << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(n) / (1ull << 30));
    if (n >= (1ull << 20)) return fmt::format("{:.2f} MiB", static_cast<double>(n) / (1ull << 20));
    if (n >= (1ull << 10)) return fmt::format("{:.2f} KiB", static_cast<double>(n) / (1ull << 10));
    return fmt::format("{} B", n);
}

status host_memory_check(const std::string& what, uint64_t needed, const std::string& hint) {
    const uint64_t avail = host_memory_available();
    if (avail == 0 || needed <= avail) return status::ok();
    return make_error(status_code::STATUS_OUT_OF_MEMORY, "{} needs about {} but only {} is available{}; {}", what,
                      human_bytes(needed), human_bytes(avail),
                      std::getenv("GPTQ_MEMORY_LIMIT_BYTES") ? " (GPTQ_MEMORY_LIMIT_BYTES)" : "", hint);
}

}  // namespace gptq
