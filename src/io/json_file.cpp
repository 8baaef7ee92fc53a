#include "io/json_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace gptq {

bool file_exists(const std::string& path) {
    struct stat st {};
    return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

const char* file_kind_name(unsigned mode) {
    if (S_ISREG(mode)) return "a regular file";
    if (S_ISDIR(mode)) return "a folder";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

bool dir_exists(const std::string& path) {
    struct stat st {};
    return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string path_join(const std::string& a, const std::string& b) {
    if (a.empty()) return b;
    if (a.back() == '/') return a + b;
    return a + "/" + b;
}

result<std::string> file_read_all(const std::string& path) {
    // O_NONBLOCK: a FIFO would block open() until a writer comes; it is refused below instead.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        const auto code = errno == ENOENT ? status_code::STATUS_NOT_FOUND : status_code::STATUS_IO_ERROR;
        return make_error(code, "{}: cannot open: {}", path, std::strerror(errno));
    }
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        const char* kind = file_kind_name(st.st_mode);
        ::close(fd);
        return make_error(status_code::STATUS_IO_ERROR, "{}: not a regular file ({})", path, kind);
    }
    std::string out;
    out.resize(static_cast<size_t>(st.st_size));
    size_t pos = 0;
    while (pos < out.size()) {
        const ssize_t r = ::read(fd, out.data() + pos, out.size() - pos);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            const int err = errno;
            ::close(fd);
            return make_error(status_code::STATUS_IO_ERROR, "{}: read failed: {}", path, std::strerror(err));
        }
        if (r == 0) break;
        pos += static_cast<size_t>(r);
    }
    ::close(fd);
    out.resize(pos);
    return out;
}

result<json> json_parse(std::string_view text, const std::string& path_for_errors) {
    try {
        return json::parse(text.begin(), text.end());
    } catch (const json::parse_error& e) {
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: invalid JSON at byte {}: {}", path_for_errors, e.byte,
                          e.what());
    } catch (const json::exception& e) {
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: invalid JSON: {}", path_for_errors, e.what());
    }
}

result<json> json_read_file(const std::string& path) {
    GPTQ_ASSIGN_OR_RETURN(std::string text, file_read_all(path));
    return json_parse(text, path);
}

status file_write_atomic(const std::string& path, std::string_view text) {
    const std::string tmp = path + ".tmp-" + std::to_string(getpid());
    const int         fd  = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return make_error(status_code::STATUS_IO_ERROR, "{}: cannot create: {}", tmp, std::strerror(errno));
    size_t pos = 0;
    while (pos < text.size()) {
        const ssize_t r = ::write(fd, text.data() + pos, text.size() - pos);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            const int err = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            return make_error(status_code::STATUS_IO_ERROR, "{}: write failed: {}", tmp, std::strerror(err));
        }
        pos += static_cast<size_t>(r);
    }
    if (fsync(fd) != 0 || ::close(fd) != 0) {
        ::unlink(tmp.c_str());
        return make_error(status_code::STATUS_IO_ERROR, "{}: fsync/close failed: {}", tmp, std::strerror(errno));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        return make_error(status_code::STATUS_IO_ERROR, "{}: rename failed: {}", path, std::strerror(err));
    }
    return status::ok();
}

// ---- typed field access --------------------------------------------------------------------------

std::string json_fields::quote(const json& v) {
    std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return s;
}

bool json_fields::has(const char* key) const {
    auto it = obj.find(key);
    return it != obj.end() && !it->is_null();
}

result<int64_t> json_fields::get_int(const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: missing required key '{}'", where, key);
    if (it->is_number_integer()) return it->get<int64_t>();
    // Accept integral floats (some writers emit 4096.0).
    if (it->is_number_float()) {
        // Range check first: casting a double outside int64's range is undefined behaviour.
        const double d = it->get<double>();
        if (d >= -9.2233720368547758e18 && d < 9.2233720368547758e18 && d == std::trunc(d))
            return static_cast<int64_t>(d);
    }
    return make_error(status_code::STATUS_PARSE_ERROR, "{}: key '{}' is {}, expected an integer", where, key,
                      quote(*it));
}

result<int64_t> json_fields::get_int_or(const char* key, int64_t def) const {
    if (!has(key)) return def;
    return get_int(key);
}

result<double> json_fields::get_number(const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: missing required key '{}'", where, key);
    if (it->is_number()) return it->get<double>();
    return make_error(status_code::STATUS_PARSE_ERROR, "{}: key '{}' is {}, expected a number", where, key, quote(*it));
}

result<double> json_fields::get_number_or(const char* key, double def) const {
    if (!has(key)) return def;
    return get_number(key);
}

result<bool> json_fields::get_bool_or(const char* key, bool def) const {
    if (!has(key)) return def;
    const auto& v = obj.at(key);
    if (v.is_boolean()) return v.get<bool>();
    return make_error(status_code::STATUS_PARSE_ERROR, "{}: key '{}' is {}, expected true or false", where, key,
                      quote(v));
}

result<std::string> json_fields::get_string(const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: missing required key '{}'", where, key);
    if (it->is_string()) return it->get<std::string>();
    return make_error(status_code::STATUS_PARSE_ERROR, "{}: key '{}' is {}, expected a string", where, key, quote(*it));
}

result<std::string> json_fields::get_string_or(const char* key, const std::string& def) const {
    if (!has(key)) return def;
    return get_string(key);
}

}  // namespace gptq
