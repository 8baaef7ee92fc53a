// status / result<T>: how every user-reachable failure travels up to the CLI.
//
// A status is OK or an error with a code and a message. Messages name the file and the offending
// value ("model.safetensors: tensor 'x' has dtype 'Q9' which is not a safetensors dtype"), so the
// tool can print one line and exit 1. Internal invariants (bugs) use GPTQ_ASSERT instead.
// This header is std-only: it is re-exported by the public API (include/gptq).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace gptq {

enum class status_code {
    STATUS_OK = 0,
    STATUS_INVALID_ARGUMENT,  // a value given by the user is out of range or malformed
    STATUS_IO_ERROR,          // open/read/write/mmap failed
    STATUS_PARSE_ERROR,       // a file's contents are malformed (JSON, safetensors header, ...)
    STATUS_UNSUPPORTED,       // well-formed but not something we implement (architecture, option)
    STATUS_NOT_FOUND,         // a file or tensor that should exist does not
    STATUS_OUT_OF_MEMORY,     // an allocation or a memory plan failed
    STATUS_CANCELLED,         // interrupted by the user
    STATUS_INTERNAL,          // a bug caught at a boundary
};

const char* status_code_name(status_code code);

class [[nodiscard]] status {
public:
    status() = default;
    status(status_code code, std::string message) : code_(code), message_(std::move(message)) {}

    static status ok() { return status(); }

    bool               is_ok() const { return code_ == status_code::STATUS_OK; }
    explicit           operator bool() const { return is_ok(); }
    status_code        code() const { return code_; }
    const std::string& message() const { return message_; }

    // Prefix the message with context ("loading layer 3: <message>"); OK stays OK.
    status with_context(const std::string& context) const {
        if (is_ok()) return *this;
        return status(code_, context + ": " + message_);
    }

private:
    status_code code_ = status_code::STATUS_OK;
    std::string message_;
};

// Either a value or an error status. Accessing the value of an error is a bug (asserts).
template <typename T>
class [[nodiscard]] result {
public:
    result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design, like std::expected
    result(status st) : v_(std::move(st)) {    // NOLINT
        if (std::get<status>(v_).is_ok()) {
            std::fprintf(stderr, "gptq: result<T> constructed from an OK status without a value\n");
            std::abort();
        }
    }

    bool     is_ok() const { return std::holds_alternative<T>(v_); }
    explicit operator bool() const { return is_ok(); }

    const status& error() const {
        static const status ok_status;
        return is_ok() ? ok_status : std::get<status>(v_);
    }
    status to_status() const { return is_ok() ? status::ok() : std::get<status>(v_); }

    T& value() & {
        check();
        return std::get<T>(v_);
    }
    const T& value() const& {
        check();
        return std::get<T>(v_);
    }
    T&& value() && {
        check();
        return std::get<T>(std::move(v_));
    }
    T*       operator->() { return &value(); }
    const T* operator->() const { return &value(); }
    T&       operator*() & { return value(); }
    const T& operator*() const& { return value(); }

private:
    void check() const {
        if (!is_ok()) {
            std::fprintf(stderr, "gptq: value() of an error result: %s\n", std::get<status>(v_).message().c_str());
            std::abort();
        }
    }
    std::variant<T, status> v_;
};

}  // namespace gptq

#define GPTQ_CONCAT_IMPL(a, b) a##b
#define GPTQ_CONCAT(a, b) GPTQ_CONCAT_IMPL(a, b)

// Return the status of `expr` (a status) from the enclosing function if it is an error.
#define GPTQ_TRY(expr)                                          \
    do {                                                        \
        ::gptq::status gptq_try_status_ = (expr);               \
        if (!gptq_try_status_.is_ok()) return gptq_try_status_; \
    } while (0)

// `lhs = value of expr` (a result<T>), or return its error from the enclosing function.
#define GPTQ_ASSIGN_OR_RETURN(lhs, expr) GPTQ_ASSIGN_OR_RETURN_IMPL(GPTQ_CONCAT(gptq_res_, __LINE__), lhs, expr)
#define GPTQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
    auto tmp = (expr);                             \
    if (!tmp.is_ok()) return tmp.error();          \
    lhs = std::move(tmp).value()
