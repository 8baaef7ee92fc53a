#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace gptq {

namespace {
std::atomic<int> g_level{static_cast<int>(log_level::LOG_INFO)};
std::mutex       g_mutex;

const char* level_prefix(log_level level) {
    switch (level) {
        case log_level::LOG_DEBUG:
            return "debug: ";
        case log_level::LOG_INFO:
            return "";
        case log_level::LOG_WARN:
            return "warning: ";
        case log_level::LOG_ERROR:
            return "error: ";
        default:
            return "";
    }
}
}  // namespace

void log_set_level(log_level level) {
    g_level.store(static_cast<int>(level));
}
log_level log_get_level() {
    return static_cast<log_level>(g_level.load());
}
bool log_enabled(log_level level) {
    return static_cast<int>(level) >= g_level.load();
}

void log_write(log_level level, std::string_view message) {
    std::lock_guard<std::mutex> lock(g_mutex);
    std::fprintf(stderr, "%s%.*s\n", level_prefix(level), static_cast<int>(message.size()), message.data());
    std::fflush(stderr);
}

}  // namespace gptq
