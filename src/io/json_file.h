// Reading JSON files with errors that name the file, the key and the value.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/status.h"

namespace gptq {

using json = nlohmann::json;

// Read and parse a whole file. Errors: missing file (NOT_FOUND), unreadable (IO_ERROR), invalid
// JSON with the byte position (PARSE_ERROR).
result<json>        json_read_file(const std::string& path);
result<json>        json_parse(std::string_view text, const std::string& path_for_errors);
result<std::string> file_read_all(const std::string& path);
// Write text to "<path>.tmp-<pid>", fsync, rename to path.
status file_write_atomic(const std::string& path, std::string_view text);
bool   file_exists(const std::string& path);
bool   dir_exists(const std::string& path);
// "a FIFO", "a folder", ... for a stat st_mode: what a path is, for errors about non-regular files.
const char* file_kind_name(unsigned mode);
std::string path_join(const std::string& a, const std::string& b);

// Typed field access on a JSON object. `where` names the file for messages. A missing key gives
// the default (get_*_or) or an error naming the key (get_*); a key of the wrong type is an error
// quoting the value. JSON null counts as missing.
struct json_fields {
    const json&        obj;
    const std::string& where;

    bool                has(const char* key) const;
    result<int64_t>     get_int(const char* key) const;
    result<int64_t>     get_int_or(const char* key, int64_t def) const;
    result<double>      get_number(const char* key) const;
    result<double>      get_number_or(const char* key, double def) const;
    result<bool>        get_bool_or(const char* key, bool def) const;
    result<std::string> get_string(const char* key) const;
    result<std::string> get_string_or(const char* key, const std::string& def) const;
    // Short, single-line rendering of a value for error messages (truncated to 60 chars).
    static std::string quote(const json& v);
};

}  // namespace gptq
