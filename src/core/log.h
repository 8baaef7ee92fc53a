// Leveled logging to stderr. The level is process-wide; the CLI sets it from --verbose/--quiet.
#pragma once

#include <fmt/format.h>

#include <string_view>

namespace gptq {

enum class log_level : int { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3, LOG_NONE = 4 };

void      log_set_level(log_level level);
log_level log_get_level();
bool      log_enabled(log_level level);
void      log_write(log_level level, std::string_view message);

template <typename... Args>
void log_msg(log_level level, fmt::format_string<Args...> f, Args&&... args) {
    if (log_enabled(level)) log_write(level, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace gptq

#define GPTQ_LOG_DEBUG(...) ::gptq::log_msg(::gptq::log_level::LOG_DEBUG, __VA_ARGS__)
#define GPTQ_LOG_INFO(...) ::gptq::log_msg(::gptq::log_level::LOG_INFO, __VA_ARGS__)
#define GPTQ_LOG_WARN(...) ::gptq::log_msg(::gptq::log_level::LOG_WARN, __VA_ARGS__)
#define GPTQ_LOG_ERROR(...) ::gptq::log_msg(::gptq::log_level::LOG_ERROR, __VA_ARGS__)
