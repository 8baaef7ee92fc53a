// A Jinja subset for chat templates (include/gptq/chat.h: chat_template_render), with the
// environment transformers uses for apply_chat_template: trim_blocks, lstrip_blocks, the
// loopcontrols extension, and raise_exception / strftime_now / tojson.
//
// Pipeline: lex (text and {{ }}, {% %}, {# #} tags, whitespace control) -> parse (statement tree and
// Pratt-style expressions with Jinja's precedence) -> render (values with Python semantics).
// Unknown tags and syntax are parse errors; unknown filters, tests, functions and methods are
// errors when reached (so a template stays usable when only a branch it does not take uses one).
// Every error names the construct and the template line.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <variant>

#include "core/error.h"
#include "gptq/chat.h"

namespace gptq {

namespace {

constexpr status_code E_TMPL  = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_UNSUP = status_code::STATUS_UNSUPPORTED;
// Caps on what a (possibly hostile) template may build: range() items, repeated-string bytes.
constexpr int64_t k_max_items = int64_t(1) << 20;
// Caps that keep hostile nesting from overflowing the stack (the parser and the evaluator
// recurse): tokens per tag (bounds the depth of a left-deep chain like 1+1+1+...), nesting of
// parentheses / brackets / unary operators, nesting of block statements. Published templates stay
// far below (longest tag ~60 tokens, nesting < 10).
constexpr size_t k_max_tag_tokens = 512;
constexpr int    k_max_expr_nest  = 128;
constexpr int    k_max_block_nest = 64;
constexpr int    k_max_value_nest = 64;  // lists / dicts inside each other
// Work per render: expression evaluations plus loop iterations, and the rendered text's size, so
// that nested loops (each up to k_max_items long) end in an error instead of running for hours.
// A chat of thousands of messages stays below (a published template spends ~50 steps a message).
constexpr int64_t k_max_work         = int64_t(1) << 18;
constexpr size_t  k_max_output_bytes = size_t(1) << 24;

struct nest_guard {  // counts one level of recursion for as long as it lives
    int& depth;
    explicit nest_guard(int& d) : depth(d) { ++depth; }
    ~nest_guard() { --depth; }
    nest_guard(const nest_guard&)            = delete;
    nest_guard& operator=(const nest_guard&) = delete;
};

// tojson(indent=x): NaN, negatives and huge values must not reach an int cast (undefined behaviour).
int json_indent(double x) {
    return x >= 0.0 ? static_cast<int>(std::min(x, 64.0)) : 0;
}

// ---- values ------------------------------------------------------------------------------------------

struct value;
using value_list = std::vector<value>;
using value_dict = std::vector<std::pair<std::string, value>>;  // insertion-ordered, as Python dicts

struct value {
    enum kind_t { UNDEFINED, NONE, BOOL, INT, FLOAT, STRING, LIST, DICT } kind = UNDEFINED;
    bool                        b                                              = false;
    int64_t                     i                                              = 0;
    double                      f                                              = 0.0;
    std::string                 s;
    std::shared_ptr<value_list> list;
    std::shared_ptr<value_dict> dict;  // also a namespace() object (mutable attributes)
    bool                        is_namespace = false;
    // Nesting of lists/dicts below this value (0 for scalars), set when a list or dict is made;
    // bounded by k_max_value_nest so that printing, comparing and freeing never recurse deeply.
    // A namespace's attributes may change later, but they never hold a namespace, so a stale
    // figure is off by at most one k_max_value_nest.
    int depth = 0;

    static value none() { return with_kind(NONE); }
    static value boolean(bool v) {
        value x = with_kind(BOOL);
        x.b     = v;
        return x;
    }
    static value integer(int64_t v) {
        value x = with_kind(INT);
        x.i     = v;
        return x;
    }
    static value real(double v) {
        value x = with_kind(FLOAT);
        x.f     = v;
        return x;
    }
    static value str(std::string v) {
        value x = with_kind(STRING);
        x.s     = std::move(v);
        return x;
    }
    static value make_list(value_list v = {}) {
        value x = with_kind(LIST);
        for (const auto& e : v) x.depth = std::max(x.depth, e.depth + 1);
        x.list = std::make_shared<value_list>(std::move(v));
        return x;
    }
    static value make_dict(value_dict v = {}) {
        value x = with_kind(DICT);
        for (const auto& [k, e] : v) x.depth = std::max(x.depth, e.depth + 1);
        x.dict = std::make_shared<value_dict>(std::move(v));
        return x;
    }
    static value with_kind(kind_t k) {
        value x;
        x.kind = k;
        return x;
    }
    bool         is_number() const { return kind == INT || kind == FLOAT || kind == BOOL; }
    double       number() const { return kind == FLOAT ? f : kind == INT ? static_cast<double>(i) : b ? 1.0 : 0.0; }
    const value* get(const std::string& key) const {
        if (kind != DICT) return nullptr;
        for (auto& [k, v] : *dict)
            if (k == key) return &v;
        return nullptr;
    }
};

const char* kind_name(const value& v) {
    switch (v.kind) {
        case value::UNDEFINED:
            return "undefined";
        case value::NONE:
            return "none";
        case value::BOOL:
            return "bool";
        case value::INT:
            return "int";
        case value::FLOAT:
            return "float";
        case value::STRING:
            return "string";
        case value::LIST:
            return "list";
        default:
            return v.is_namespace ? "namespace" : "dict";
    }
}

bool truthy(const value& v) {
    switch (v.kind) {
        case value::UNDEFINED:
        case value::NONE:
            return false;
        case value::BOOL:
            return v.b;
        case value::INT:
            return v.i != 0;
        case value::FLOAT:
            return v.f != 0.0;
        case value::STRING:
            return !v.s.empty();
        case value::LIST:
            return !v.list->empty();
        default:
            return v.is_namespace || !v.dict->empty();
    }
}

std::string float_repr(double d) {
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e16) return fmt::format("{:.1f}", d);
    return fmt::format("{}", d);  // shortest round-trip, as Python's repr
}

std::string py_quote(const std::string& s) {
    const char  q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
    std::string out(1, q);
    for (char c : s) {
        if (c == q || c == '\\')
            out += '\\', out += c;
        else if (c == '\n')
            out += "\\n";
        else if (c == '\t')
            out += "\\t";
        else
            out += c;
    }
    return out + q;
}

std::string repr(const value& v, bool top);
std::string to_string(const value& v) {
    return repr(v, true);
}
// str() at the top level, repr() inside containers, as Python prints them.
std::string repr(const value& v, bool top) {
    switch (v.kind) {
        case value::UNDEFINED:
            return "";
        case value::NONE:
            return "None";
        case value::BOOL:
            return v.b ? "True" : "False";
        case value::INT:
            return std::to_string(v.i);
        case value::FLOAT:
            return float_repr(v.f);
        case value::STRING:
            return top ? v.s : py_quote(v.s);
        case value::LIST: {
            std::string out = "[";
            for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + repr((*v.list)[i], false);
            return out + "]";
        }
        default: {
            std::string out = v.is_namespace ? "<Namespace {" : "{";
            size_t      i   = 0;
            for (auto& [k, x] : *v.dict) out += (i++ ? ", " : "") + py_quote(k) + ": " + repr(x, false);
            return out + (v.is_namespace ? "}>" : "}");
        }
    }
}

void json_escape(const std::string& s, std::string& out) {
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"':
                out += "\\\"";
                break;
            case '\\':
                out += "\\\\";
                break;
            case '\n':
                out += "\\n";
                break;
            case '\r':
                out += "\\r";
                break;
            case '\t':
                out += "\\t";
                break;
            case '\b':
                out += "\\b";
                break;
            case '\f':
                out += "\\f";
                break;
            default:
                if (c < 0x20)
                    out += fmt::format("\\u{:04x}", c);
                else
                    out += static_cast<char>(c);  // ensure_ascii=False, as transformers' tojson
        }
    }
    out += '"';
}

// json.dumps(v, ensure_ascii=False, indent=indent): separators ", " / ": " without indent.
void to_json(const value& v, int indent, int depth, std::string& out) {
    auto nl = [&](int d) {
        if (indent > 0) out += "\n" + std::string(static_cast<size_t>(indent * d), ' ');
    };
    switch (v.kind) {
        case value::UNDEFINED:
        case value::NONE:
            out += "null";
            return;
        case value::BOOL:
            out += v.b ? "true" : "false";
            return;
        case value::INT:
            out += std::to_string(v.i);
            return;
        case value::FLOAT:
            out += float_repr(v.f);
            return;
        case value::STRING:
            json_escape(v.s, out);
            return;
        case value::LIST:
            out += '[';
            for (size_t i = 0; i < v.list->size(); ++i) {
                out += i ? (indent > 0 ? "," : ", ") : "";
                nl(depth + 1);
                to_json((*v.list)[i], indent, depth + 1, out);
            }
            if (!v.list->empty()) nl(depth);
            out += ']';
            return;
        default: {
            out += '{';
            size_t i = 0;
            for (auto& [k, x] : *v.dict) {
                out += i++ ? (indent > 0 ? "," : ", ") : "";
                nl(depth + 1);
                json_escape(k, out);
                out += ": ";
                to_json(x, indent, depth + 1, out);
            }
            if (!v.dict->empty()) nl(depth);
            out += '}';
        }
    }
}

bool equal(const value& a, const value& b) {
    if (a.is_number() && b.is_number()) return a.number() == b.number();
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case value::UNDEFINED:
        case value::NONE:
            return true;
        case value::STRING:
            return a.s == b.s;
        case value::LIST:
            if (a.list->size() != b.list->size()) return false;
            for (size_t i = 0; i < a.list->size(); ++i)
                if (!equal((*a.list)[i], (*b.list)[i])) return false;
            return true;
        default:
            if (a.dict == b.dict) return true;
            if (a.dict->size() != b.dict->size()) return false;
            for (auto& [k, x] : *a.dict) {
                const value* y = b.get(k);
                if (!y || !equal(x, *y)) return false;
            }
            return true;
    }
}

// ---- lexer: template -> text / tag pieces ---------------------------------------------------------

struct piece {
    enum kind_t { TEXT, OUTPUT, STMT } kind;
    std::string body;  // text, or the inside of the tag
    int         line = 1;
};

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

result<std::vector<piece>> lex(const std::string& t) {
    std::vector<piece> out;
    size_t             i = 0, n = t.size();
    int                line        = 1;
    bool               strip_next  = false;  // a "-" closed the previous tag
    bool               trim_nl     = false;  // trim_blocks: the previous block/comment tag ate one newline
    auto               count_lines = [&](size_t a, size_t b) {
        for (size_t k = a; k < b; ++k) line += t[k] == '\n';
    };
    while (i < n) {
        size_t open = t.find('{', i);
        while (open != std::string::npos && open + 1 < n && t[open + 1] != '{' && t[open + 1] != '%' &&
               t[open + 1] != '#')
            open = t.find('{', open + 1);
        if (open + 1 >= n) open = std::string::npos;
        std::string text      = t.substr(i, (open == std::string::npos ? n : open) - i);
        const int   text_line = line;
        count_lines(i, open == std::string::npos ? n : open);
        if (trim_nl && !text.empty() && text[0] == '\n') text.erase(0, 1);
        if (strip_next) {
            size_t k = 0;
            while (k < text.size() && is_space(text[k])) ++k;
            text.erase(0, k);
        }
        trim_nl = strip_next = false;
        if (open == std::string::npos) {
            if (!text.empty()) out.push_back({piece::TEXT, text, text_line});
            break;
        }
        const char kind       = t[open + 1];
        const bool minus_left = open + 2 < n && t[open + 2] == '-';
        const bool plus_left  = open + 2 < n && t[open + 2] == '+';
        if (minus_left) {
            while (!text.empty() && is_space(text.back())) text.pop_back();
        } else if (kind != '{' && !plus_left) {  // lstrip_blocks: blanks between line start and the tag
            size_t nb = 0;
            while (nb < text.size() && (text[text.size() - 1 - nb] == ' ' || text[text.size() - 1 - nb] == '\t')) ++nb;
            const size_t first_blank = open - nb;  // the blanks are the last nb characters before the tag
            if (first_blank == 0 || t[first_blank - 1] == '\n') text.erase(text.size() - nb);
        }
        if (!text.empty()) out.push_back({piece::TEXT, text, text_line});
        const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        size_t      body0 = open + 2 + (minus_left || plus_left ? 1 : 0);
        size_t      end   = t.find(close, body0);
        // A closing "}}" or "%}" inside a string literal of the tag must not end it.
        if (kind != '#') {
            char q = 0;
            for (size_t k = body0; k < n; ++k) {
                if (q) {
                    if (t[k] == '\\')
                        ++k;
                    else if (t[k] == q)
                        q = 0;
                } else if (t[k] == '\'' || t[k] == '"') {
                    q = t[k];
                } else if (t.compare(k, 2, close) == 0) {
                    end = k;
                    break;
                }
            }
        }
        if (end == std::string::npos)
            return make_error(E_TMPL, "chat template: '{}' at line {} is never closed", t.substr(open, 2), line);
        bool        minus_right = end > body0 && t[end - 1] == '-';
        std::string body        = t.substr(body0, end - body0 - (minus_right ? 1 : 0));
        const int   tag_line    = line;
        count_lines(open, end + 2);
        if (kind == '{')
            out.push_back({piece::OUTPUT, body, tag_line});
        else if (kind == '%')
            out.push_back({piece::STMT, body, tag_line});
        strip_next = minus_right;
        trim_nl    = kind != '{' && !minus_right;
        i          = end + 2;
    }
    return out;
}

// ---- expression tokens and AST --------------------------------------------------------------------

struct token {
    enum kind_t { NAME, STRING, INT, FLOAT, OP, END } kind = END;
    std::string text;
    int64_t     i = 0;
    double      f = 0.0;
};

result<std::vector<token>> tokenize(const std::string& s, int line) {
    std::vector<token> out;
    size_t             i = 0;
    while (i < s.size()) {
        const char c = s[i];
        if (is_space(c)) {
            ++i;
        } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
            size_t j = i;
            while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
            out.push_back({token::NAME, s.substr(i, j - i)});
            i = j;
        } else if (std::isdigit(static_cast<unsigned char>(c))) {
            size_t j = i;
            while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
            if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
                ++j;
                while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
                token t{token::FLOAT, s.substr(i, j - i)};
                t.f = std::strtod(t.text.c_str(), nullptr);
                out.push_back(t);
            } else {
                token t{token::INT, s.substr(i, j - i)};
                if (std::from_chars(t.text.data(), t.text.data() + t.text.size(), t.i).ec != std::errc())
                    return make_error(E_TMPL, "chat template: integer {} out of range at line {}", t.text, line);
                out.push_back(t);
            }
            i = j;
        } else if (c == '\'' || c == '"') {
            std::string v;
            size_t      j = i + 1;
            for (; j < s.size() && s[j] != c; ++j) {
                if (s[j] == '\\' && j + 1 < s.size()) {
                    const char e = s[++j];
                    switch (e) {
                        case 'n':
                            v += '\n';
                            break;
                        case 't':
                            v += '\t';
                            break;
                        case 'r':
                            v += '\r';
                            break;
                        case '\\':
                            v += '\\';
                            break;
                        case '\'':
                            v += '\'';
                            break;
                        case '"':
                            v += '"';
                            break;
                        case 'u': {  // \uXXXX, as Python string literals
                            if (j + 4 >= s.size() ||
                                !std::all_of(s.begin() + static_cast<std::ptrdiff_t>(j) + 1,
                                             s.begin() + static_cast<std::ptrdiff_t>(j) + 5,
                                             [](char h) { return std::isxdigit(static_cast<unsigned char>(h)) != 0; }))
                                return make_error(E_TMPL, "chat template: bad \\u escape at line {}", line);
                            const uint32_t cp = static_cast<uint32_t>(std::stoul(s.substr(j + 1, 4), nullptr, 16));
                            j += 4;
                            if (cp < 0x80) {
                                v += static_cast<char>(cp);
                            } else if (cp < 0x800) {
                                v += static_cast<char>(0xC0 | (cp >> 6));
                                v += static_cast<char>(0x80 | (cp & 0x3F));
                            } else {
                                v += static_cast<char>(0xE0 | (cp >> 12));
                                v += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                                v += static_cast<char>(0x80 | (cp & 0x3F));
                            }
                            break;
                        }
                        default:
                            v += '\\', v += e;
                    }
                } else {
                    v += s[j];
                }
            }
            if (j >= s.size()) return make_error(E_TMPL, "chat template: unterminated string at line {}", line);
            out.push_back({token::STRING, v});
            i = j + 1;
        } else {
            static const char* ops[]   = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                          ">",  "(",  ")",  "[",  "]",  "{",  "}", ".", ",", ":", "|", "="};
            bool               matched = false;
            for (const char* op : ops) {
                const size_t len = std::char_traits<char>::length(op);
                if (s.compare(i, len, op) == 0) {
                    out.push_back({token::OP, op});
                    i += len;
                    matched = true;
                    break;
                }
            }
            if (!matched) return make_error(E_TMPL, "chat template: unexpected character '{}' at line {}", c, line);
        }
    }
    out.push_back({token::END, ""});
    return out;
}

struct expr;
using expr_ptr = std::shared_ptr<expr>;
struct expr {
    enum kind_t {
        LITERAL,
        NAME,
        LIST,
        DICT,
        ATTR,
        INDEX,
        SLICE,
        CALL,
        FILTER,
        TEST,
        UNARY,
        BINARY,
        AND,
        OR,
        NOT,
        COND
    } kind;
    value                                         lit;
    std::string                                   name;            // variable / attribute / filter / test / operator
    std::vector<expr_ptr>                         args;            // operands, list items, call args, slice parts
    std::vector<std::pair<std::string, expr_ptr>> kwargs;          // call keyword args, dict items
    bool                                          negate = false;  // "is not"
};

expr_ptr make_expr(expr::kind_t k) {
    auto e  = std::make_shared<expr>();
    e->kind = k;
    return e;
}

class expr_parser {
public:
    expr_parser(std::vector<token> toks, int line) : t_(std::move(toks)), line_(line) {}
    int nest_ = 0;  // current recursion depth (parse_not / parse_unary levels)

    result<expr_ptr> parse_full() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_cond());
        if (peek().kind != token::END) return error("unexpected '{}'", peek().text);
        return e;
    }
    result<expr_ptr> parse_cond() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_or());
        while (is_name("if")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto c, parse_or());
            auto r  = make_expr(expr::COND);
            r->args = {c, e, nullptr};
            if (is_name("else")) {
                ++p_;
                GPTQ_ASSIGN_OR_RETURN(r->args[2], parse_cond());
            }
            e = r;
        }
        return e;
    }
    // For "for x in EXPR if COND": the iterable stops before a trailing "if".
    result<expr_ptr> parse_or() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_and());
        while (is_name("or")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_and());
            e = binary(expr::OR, "or", e, r);
        }
        return e;
    }
    const token& peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
    bool         is_name(const char* n, size_t k = 0) const { return peek(k).kind == token::NAME && peek(k).text == n; }
    bool         is_op(const char* o, size_t k = 0) const { return peek(k).kind == token::OP && peek(k).text == o; }
    bool         at_end() const { return peek().kind == token::END; }
    void         skip() { ++p_; }
    result<std::string> expect_name() {
        if (peek().kind != token::NAME) return error("expected a name, got '{}'", peek().text);
        return t_[p_++].text;
    }
    template <typename... Args>
    status error(fmt::format_string<Args...> f, Args&&... args) const {
        return make_error(E_TMPL, "chat template: {} at line {}", fmt::format(f, std::forward<Args>(args)...), line_);
    }

private:
    static expr_ptr binary(expr::kind_t k, const std::string& op, expr_ptr a, expr_ptr b) {
        auto e  = make_expr(k);
        e->name = op;
        e->args = {std::move(a), std::move(b)};
        return e;
    }
    result<expr_ptr> parse_and() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_not());
        while (is_name("and")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_not());
            e = binary(expr::AND, "and", e, r);
        }
        return e;
    }
    result<expr_ptr> parse_not() {
        nest_guard g(nest_);
        if (nest_ > k_max_expr_nest) return error("expression nested more than {} deep", k_max_expr_nest);
        if (is_name("not")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto x, parse_not());
            auto e  = make_expr(expr::NOT);
            e->args = {x};
            return e;
        }
        return parse_compare();
    }
    result<expr_ptr> parse_compare() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_math1());
        for (;;) {
            std::string op;
            if (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">=")) {
                op = t_[p_++].text;
            } else if (is_name("in")) {
                ++p_;
                op = "in";
            } else if (is_name("not") && is_name("in", 1)) {
                p_ += 2;
                op = "not in";
            } else {
                return e;
            }
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_math1());
            e = binary(expr::BINARY, op, e, r);
        }
    }
    result<expr_ptr> parse_math1() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_concat());
        while (is_op("+") || is_op("-")) {
            const std::string op = t_[p_++].text;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_concat());
            e = binary(expr::BINARY, op, e, r);
        }
        return e;
    }
    result<expr_ptr> parse_concat() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_math2());
        while (is_op("~")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_math2());
            e = binary(expr::BINARY, "~", e, r);
        }
        return e;
    }
    result<expr_ptr> parse_math2() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_pow());
        while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
            const std::string op = t_[p_++].text;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_pow());
            e = binary(expr::BINARY, op, e, r);
        }
        return e;
    }
    result<expr_ptr> parse_pow() {
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_unary());
        while (is_op("**")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto r, parse_unary());
            e = binary(expr::BINARY, "**", e, r);
        }
        return e;
    }
    result<expr_ptr> parse_unary() {
        nest_guard g(nest_);
        if (nest_ > k_max_expr_nest) return error("expression nested more than {} deep", k_max_expr_nest);
        if (is_op("-") || is_op("+")) {
            const std::string op = t_[p_++].text;
            GPTQ_ASSIGN_OR_RETURN(auto x, parse_unary());
            auto e  = make_expr(expr::UNARY);
            e->name = op;
            e->args = {x};
            return parse_filters(e);
        }
        GPTQ_ASSIGN_OR_RETURN(auto e, parse_primary());
        GPTQ_ASSIGN_OR_RETURN(e, parse_postfix(e));
        return parse_filters(e);
    }
    result<expr_ptr> parse_primary() {
        const token tk = peek();
        if (tk.kind == token::STRING) {
            ++p_;
            auto e = make_expr(expr::LITERAL);
            e->lit = value::str(tk.text);
            while (peek().kind == token::STRING) e->lit.s += t_[p_++].text;  // adjacent literals join
            return e;
        }
        if (tk.kind == token::INT || tk.kind == token::FLOAT) {
            ++p_;
            auto e = make_expr(expr::LITERAL);
            e->lit = tk.kind == token::INT ? value::integer(tk.i) : value::real(tk.f);
            return e;
        }
        if (tk.kind == token::NAME) {
            ++p_;
            auto e = make_expr(expr::LITERAL);
            if (tk.text == "true" || tk.text == "True")
                e->lit = value::boolean(true);
            else if (tk.text == "false" || tk.text == "False")
                e->lit = value::boolean(false);
            else if (tk.text == "none" || tk.text == "None")
                e->lit = value::none();
            else {
                e->kind = expr::NAME;
                e->name = tk.text;
            }
            return e;
        }
        if (is_op("(")) {
            ++p_;
            GPTQ_ASSIGN_OR_RETURN(auto e, parse_cond());
            if (is_op(",")) return error("tuples are not supported");
            if (!is_op(")")) return error("expected ')', got '{}'", peek().text);
            ++p_;
            return e;
        }
        if (is_op("[")) {
            ++p_;
            auto e = make_expr(expr::LIST);
            while (!is_op("]")) {
                GPTQ_ASSIGN_OR_RETURN(auto x, parse_cond());
                e->args.push_back(x);
                if (is_op(","))
                    ++p_;
                else if (!is_op("]"))
                    return error("expected ',' or ']' in a list, got '{}'", peek().text);
            }
            ++p_;
            return e;
        }
        if (is_op("{")) {
            ++p_;
            auto e = make_expr(expr::DICT);
            while (!is_op("}")) {
                if (peek().kind != token::STRING) return error("dict keys must be string literals");
                std::string key = t_[p_++].text;
                if (!is_op(":")) return error("expected ':' in a dict, got '{}'", peek().text);
                ++p_;
                GPTQ_ASSIGN_OR_RETURN(auto x, parse_cond());
                e->kwargs.emplace_back(key, x);
                if (is_op(","))
                    ++p_;
                else if (!is_op("}"))
                    return error("expected ',' or '}}' in a dict, got '{}'", peek().text);
            }
            ++p_;
            return e;
        }
        return error("unexpected '{}'", tk.kind == token::END ? "end of expression" : tk.text);
    }
    result<expr_ptr> parse_call_args(expr_ptr call) {
        ++p_;  // (
        while (!is_op(")")) {
            if (peek().kind == token::NAME && is_op("=", 1)) {
                std::string k = t_[p_].text;
                p_ += 2;
                GPTQ_ASSIGN_OR_RETURN(auto x, parse_cond());
                call->kwargs.emplace_back(k, x);
            } else {
                GPTQ_ASSIGN_OR_RETURN(auto x, parse_cond());
                call->args.push_back(x);
            }
            if (is_op(","))
                ++p_;
            else if (!is_op(")"))
                return error("expected ',' or ')' in a call, got '{}'", peek().text);
        }
        ++p_;
        return call;
    }
    result<expr_ptr> parse_postfix(expr_ptr e) {
        for (;;) {
            if (is_op(".")) {
                ++p_;
                GPTQ_ASSIGN_OR_RETURN(std::string n, expect_name());
                auto a  = make_expr(expr::ATTR);
                a->name = n;
                a->args = {e};
                e       = a;
            } else if (is_op("[")) {
                ++p_;
                std::array<expr_ptr, 3> part{};
                int                     n_colon = 0;
                while (!is_op("]")) {
                    if (is_op(":")) {
                        if (++n_colon > 2) return error("bad slice");
                        ++p_;
                        continue;
                    }
                    if (part[static_cast<size_t>(n_colon)]) return error("expected ']' in a subscript");
                    GPTQ_ASSIGN_OR_RETURN(part[static_cast<size_t>(n_colon)], parse_cond());
                }
                ++p_;
                if (n_colon == 0 && !part[0]) return error("empty subscript '[]'");
                auto a  = make_expr(n_colon ? expr::SLICE : expr::INDEX);
                a->args = {e, part[0], part[1], part[2]};
                e       = a;
            } else if (is_op("(")) {
                auto c  = make_expr(expr::CALL);
                c->args = {e};
                GPTQ_ASSIGN_OR_RETURN(e, parse_call_args(c));
            } else {
                return e;
            }
        }
    }
    result<expr_ptr> parse_filters(expr_ptr e) {
        for (;;) {
            if (is_op("|")) {
                ++p_;
                GPTQ_ASSIGN_OR_RETURN(std::string n, expect_name());
                auto f  = make_expr(expr::FILTER);
                f->name = n;
                f->args = {e};
                if (is_op("(")) {
                    GPTQ_ASSIGN_OR_RETURN(f, parse_call_args(f));
                }
                e = f;
            } else if (is_name("is")) {
                ++p_;
                auto t = make_expr(expr::TEST);
                if (is_name("not")) {
                    ++p_;
                    t->negate = true;
                }
                GPTQ_ASSIGN_OR_RETURN(t->name, expect_name());
                t->args = {e};
                if (is_op("(")) {
                    GPTQ_ASSIGN_OR_RETURN(t, parse_call_args(t));
                } else if (peek().kind == token::STRING || peek().kind == token::INT || peek().kind == token::NAME) {
                    if (!is_name("and") && !is_name("or") && !is_name("else") && !is_name("if")) {
                        GPTQ_ASSIGN_OR_RETURN(auto arg, parse_primary());  // "is equalto 3"
                        t->args.push_back(arg);
                    }
                }
                e = t;
            } else {
                return e;
            }
        }
    }

    std::vector<token> t_;
    size_t             p_ = 0;
    int                line_;
};

// ---- statements ---------------------------------------------------------------------------------------

struct node;
using node_list = std::vector<std::shared_ptr<node>>;
struct node {
    enum kind_t { TEXT, OUTPUT, IF, FOR, SET, BREAK, CONTINUE } kind;
    int                                         line = 0;
    std::string                                 text;
    expr_ptr                                    e;         // OUTPUT / SET value / FOR iterable
    std::vector<std::pair<expr_ptr, node_list>> branches;  // IF: (cond or null for else, body)
    std::vector<std::string>                    targets;   // FOR loop variables; SET: name or [ns, attr]
    expr_ptr                                    filter;    // FOR ... if COND
    node_list                                   body, else_body;
};

class stmt_parser {
public:
    explicit stmt_parser(const std::vector<piece>& p) : p_(p) {}
    int nest_ = 0;  // current parse_block depth

    // Parse until one of `ends` (returned in *end_tag, its tokens kept in *end_toks) or the end.
    status parse_block(node_list& out, const std::vector<std::string>& ends, std::string* end_tag,
                       std::vector<token>* end_toks, int open_line, const char* open_tag) {
        nest_guard g(nest_);
        if (nest_ > k_max_block_nest)
            return make_error(E_TMPL, "chat template: blocks nested more than {} deep at line {}", k_max_block_nest,
                              open_line);
        while (i_ < p_.size()) {
            const piece& pc = p_[i_++];
            if (pc.kind == piece::TEXT) {
                auto n  = std::make_shared<node>();
                n->kind = node::TEXT;
                n->text = pc.body;
                out.push_back(n);
                continue;
            }
            GPTQ_ASSIGN_OR_RETURN(auto toks, tokenize(pc.body, pc.line));
            if (toks.size() > k_max_tag_tokens)
                return make_error(E_TMPL, "chat template: a tag of {} tokens at line {} (more than {})", toks.size(),
                                  pc.line, k_max_tag_tokens);
            if (pc.kind == piece::OUTPUT) {
                expr_parser ep(toks, pc.line);
                auto        n = std::make_shared<node>();
                n->kind       = node::OUTPUT;
                n->line       = pc.line;
                GPTQ_ASSIGN_OR_RETURN(n->e, ep.parse_full());
                out.push_back(n);
                continue;
            }
            if (toks[0].kind != token::NAME) return make_error(E_TMPL, "chat template: empty tag at line {}", pc.line);
            const std::string tag = toks[0].text;
            for (const auto& e : ends)
                if (tag == e) {
                    *end_tag  = tag;
                    *end_toks = toks;
                    return status::ok();
                }
            expr_parser ep(toks, pc.line);
            ep.skip();
            auto n  = std::make_shared<node>();
            n->line = pc.line;
            if (tag == "if") {
                n->kind = node::IF;
                GPTQ_ASSIGN_OR_RETURN(auto cond, ep.parse_full());
                std::string        end;
                std::vector<token> et;
                for (;;) {
                    node_list body;
                    GPTQ_TRY(parse_block(body, {"elif", "else", "endif"}, &end, &et, pc.line, "if"));
                    n->branches.emplace_back(cond, std::move(body));
                    if (end == "endif") break;
                    if (end == "else") {
                        node_list eb;
                        GPTQ_TRY(parse_block(eb, {"endif"}, &end, &et, pc.line, "if"));
                        n->branches.emplace_back(nullptr, std::move(eb));
                        break;
                    }
                    expr_parser cp(et, pc.line);  // elif
                    cp.skip();
                    GPTQ_ASSIGN_OR_RETURN(cond, cp.parse_full());
                }
            } else if (tag == "for") {
                n->kind = node::FOR;
                for (;;) {
                    GPTQ_ASSIGN_OR_RETURN(std::string v, ep.expect_name());
                    n->targets.push_back(v);
                    if (!ep.is_op(",")) break;
                    ep.skip();
                }
                if (!ep.is_name("in")) return ep.error("expected 'in' in a for tag");
                ep.skip();
                GPTQ_ASSIGN_OR_RETURN(n->e, ep.parse_or());
                if (ep.is_name("if")) {
                    ep.skip();
                    GPTQ_ASSIGN_OR_RETURN(n->filter, ep.parse_or());
                }
                if (ep.is_name("recursive")) return ep.error("unsupported 'recursive' loop");
                if (!ep.at_end()) return ep.error("unexpected '{}' in a for tag", ep.peek().text);
                std::string        end;
                std::vector<token> et;
                GPTQ_TRY(parse_block(n->body, {"else", "endfor"}, &end, &et, pc.line, "for"));
                if (end == "else") GPTQ_TRY(parse_block(n->else_body, {"endfor"}, &end, &et, pc.line, "for"));
            } else if (tag == "set") {
                n->kind = node::SET;
                GPTQ_ASSIGN_OR_RETURN(std::string v, ep.expect_name());
                n->targets.push_back(v);
                if (ep.is_op(".")) {
                    ep.skip();
                    GPTQ_ASSIGN_OR_RETURN(std::string attr, ep.expect_name());
                    n->targets.push_back(attr);
                }
                if (ep.is_op(",")) return ep.error("unsupported tuple assignment in 'set'");
                if (!ep.is_op("=")) return ep.error("unsupported block 'set' (only 'set x = expr')");
                ep.skip();
                GPTQ_ASSIGN_OR_RETURN(n->e, ep.parse_full());
            } else if (tag == "break" || tag == "continue") {
                n->kind = tag == "break" ? node::BREAK : node::CONTINUE;
            } else if (tag == "generation") {  // transformers' assistant-mask marker: render the body
                std::string        end;
                std::vector<token> et;
                GPTQ_TRY(parse_block(out, {"endgeneration"}, &end, &et, pc.line, "generation"));
                continue;
            } else {
                return make_error(E_UNSUP, "chat template: unsupported tag '{}' at line {}", tag, pc.line);
            }
            out.push_back(n);
        }
        if (!ends.empty())
            return make_error(E_TMPL, "chat template: '{}' at line {} is never closed (expected '{}')", open_tag,
                              open_line, ends.back());
        return status::ok();
    }

private:
    const std::vector<piece>& p_;
    size_t                    i_ = 0;
};

// ---- rendering ---------------------------------------------------------------------------------------

class renderer {
public:
    explicit renderer(value globals) { scopes_.push_back(std::move(globals)); }

    status render(const node_list& nodes, std::string& out) {
        for (const auto& n : nodes) {
            if (flow_ != FLOW_NONE) return status::ok();
            switch (n->kind) {
                case node::TEXT:
                    out += n->text;
                    break;
                case node::OUTPUT: {
                    GPTQ_ASSIGN_OR_RETURN(value v, eval(*n->e, n->line));
                    out += to_string(v);
                    break;
                }
                case node::IF:
                    for (const auto& [cond, body] : n->branches) {
                        bool take = true;
                        if (cond) {
                            GPTQ_ASSIGN_OR_RETURN(value c, eval(*cond, n->line));
                            take = truthy(c);
                        }
                        if (take) {
                            GPTQ_TRY(render(body, out));
                            break;
                        }
                    }
                    break;
                case node::SET: {
                    GPTQ_ASSIGN_OR_RETURN(value v, eval(*n->e, n->line));
                    if (n->targets.size() == 1) {
                        assign(scopes_.back(), n->targets[0], v);
                    } else {
                        value ns = lookup(n->targets[0]);
                        if (!ns.is_namespace)
                            return make_error(E_TMPL, "chat template: cannot set attribute of '{}' ({}) at line {}",
                                              n->targets[0], kind_name(ns), n->line);
                        if (holds_namespace(v))
                            return make_error(E_TMPL, "chat template: a namespace cannot hold a namespace at line {}",
                                              n->line);
                        assign(ns, n->targets[1], v);
                    }
                    break;
                }
                case node::FOR:
                    GPTQ_TRY(render_for(*n, out));
                    break;
                case node::BREAK:
                    flow_ = FLOW_BREAK;
                    break;
                case node::CONTINUE:
                    flow_ = FLOW_CONTINUE;
                    break;
            }
        }
        return status::ok();
    }

private:
    enum flow_t { FLOW_NONE, FLOW_BREAK, FLOW_CONTINUE };

    static void assign(value& scope, const std::string& k, const value& v) {
        for (auto& [key, x] : *scope.dict)
            if (key == k) {
                x = v;
                return;
            }
        scope.dict->emplace_back(k, v);
    }
    value lookup(const std::string& name) const {
        for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it)
            if (const value* v = it->get(name)) return *v;
        return value{};
    }

    result<value_list> iterate(const value& v, int line) {
        switch (v.kind) {
            case value::UNDEFINED:
            case value::NONE:
                return value_list{};
            case value::LIST:
                return *v.list;
            case value::STRING: {
                value_list out;
                for (size_t i = 0; i < v.s.size();) {
                    size_t     len = 1;
                    const auto c   = static_cast<unsigned char>(v.s[i]);
                    if (c >= 0xF0)
                        len = 4;
                    else if (c >= 0xE0)
                        len = 3;
                    else if (c >= 0xC0)
                        len = 2;
                    out.push_back(value::str(v.s.substr(i, len)));
                    i += len;
                }
                return out;
            }
            case value::DICT: {
                value_list out;
                for (auto& [k, x] : *v.dict) out.push_back(value::str(k));
                return out;
            }
            default:
                return make_error(E_TMPL, "chat template: cannot iterate over a {} at line {}", kind_name(v), line);
        }
    }

    status render_for(const node& n, std::string& out) {
        GPTQ_ASSIGN_OR_RETURN(value seq, eval(*n.e, n.line));
        GPTQ_ASSIGN_OR_RETURN(value_list items, iterate(seq, n.line));
        auto bind = [&](value& scope, const value& item) -> status {
            if (n.targets.size() == 1) {
                assign(scope, n.targets[0], item);
                return status::ok();
            }
            if (item.kind != value::LIST || item.list->size() != n.targets.size())
                return make_error(E_TMPL, "chat template: cannot unpack a {} into {} loop variables at line {}",
                                  kind_name(item), n.targets.size(), n.line);
            for (size_t k = 0; k < n.targets.size(); ++k) assign(scope, n.targets[k], (*item.list)[k]);
            return status::ok();
        };
        if (n.filter) {  // "for x in xs if cond": filter first, loop.* counts the kept items
            value_list kept;
            for (const auto& item : items) {
                scopes_.push_back(value::make_dict());
                status st = bind(scopes_.back(), item);
                auto   c  = st.is_ok() ? eval(*n.filter, n.line) : result<value>(st);
                scopes_.pop_back();
                if (!c) return c.error();
                if (truthy(*c)) kept.push_back(item);
            }
            items = std::move(kept);
        }
        if (items.empty()) return render(n.else_body, out);
        const int64_t len = static_cast<int64_t>(items.size());
        for (int64_t i = 0; i < len; ++i) {
            GPTQ_TRY(spend(n.line));
            if (out.size() > k_max_output_bytes)
                return fail(n.line, "the rendered text passes {} bytes", k_max_output_bytes);
            value loop = value::make_dict({{"index0", value::integer(i)},
                                           {"index", value::integer(i + 1)},
                                           {"revindex0", value::integer(len - 1 - i)},
                                           {"revindex", value::integer(len - i)},
                                           {"first", value::boolean(i == 0)},
                                           {"last", value::boolean(i == len - 1)},
                                           {"length", value::integer(len)},
                                           {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : value{}},
                                           {"nextitem", i + 1 < len ? items[static_cast<size_t>(i + 1)] : value{}}});
            scopes_.push_back(value::make_dict({{"loop", loop}}));
            status st = bind(scopes_.back(), items[static_cast<size_t>(i)]);
            if (st.is_ok()) st = render(n.body, out);
            scopes_.pop_back();
            GPTQ_TRY(st);
            const flow_t f = flow_;
            flow_          = FLOW_NONE;
            if (f == FLOW_BREAK) break;
        }
        return status::ok();
    }

    template <typename... Args>
    static status fail(int line, fmt::format_string<Args...> f, Args&&... args) {
        return make_error(E_TMPL, "chat template: {} at line {}", fmt::format(f, std::forward<Args>(args)...), line);
    }

    // A namespace holding a namespace could hold itself ({% set ns.a = ns %}): a reference cycle.
    static bool holds_namespace(const value& v) {
        if (v.is_namespace) return true;
        if (v.kind == value::LIST)
            for (const auto& x : *v.list)
                if (holds_namespace(x)) return true;
        if (v.kind == value::DICT)
            for (const auto& [k, x] : *v.dict)
                if (holds_namespace(x)) return true;
        return false;
    }

    status spend(int line) {
        if (++work_ > k_max_work)
            return fail(line, "the template does more than {} evaluation steps and loop iterations", k_max_work);
        return status::ok();
    }

    result<value> eval(const expr& e, int line) {
        GPTQ_TRY(spend(line));
        GPTQ_ASSIGN_OR_RETURN(value v, eval_node(e, line));
        if (v.depth > k_max_value_nest) return fail(line, "lists or dicts nested more than {} deep", k_max_value_nest);
        return v;
    }

    result<value> eval_node(const expr& e, int line) {
        switch (e.kind) {
            case expr::LITERAL:
                return e.lit;
            case expr::NAME:
                return lookup(e.name);
            case expr::LIST: {
                value_list items;
                for (const auto& a : e.args) {
                    GPTQ_ASSIGN_OR_RETURN(value v, eval(*a, line));
                    items.push_back(v);
                }
                return value::make_list(std::move(items));
            }
            case expr::DICT: {
                value_dict items;
                for (const auto& [k, a] : e.kwargs) {
                    GPTQ_ASSIGN_OR_RETURN(value v, eval(*a, line));
                    items.emplace_back(k, v);
                }
                return value::make_dict(std::move(items));
            }
            case expr::ATTR: {
                GPTQ_ASSIGN_OR_RETURN(value obj, eval(*e.args[0], line));
                return get_item(obj, value::str(e.name), line, true);
            }
            case expr::INDEX: {
                GPTQ_ASSIGN_OR_RETURN(value obj, eval(*e.args[0], line));
                GPTQ_ASSIGN_OR_RETURN(value key, eval(*e.args[1], line));
                return get_item(obj, key, line, false);
            }
            case expr::SLICE:
                return eval_slice(e, line);
            case expr::CALL:
                return eval_call(e, line);
            case expr::FILTER:
                return eval_filter(e, line);
            case expr::TEST: {
                GPTQ_ASSIGN_OR_RETURN(bool r, eval_test(e, line));
                return value::boolean(r != e.negate);
            }
            case expr::UNARY: {
                GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[0], line));
                if (!v.is_number()) return fail(line, "unary '{}' on a {}", e.name, kind_name(v));
                if (e.name == "+") return v;
                if (v.kind == value::FLOAT) return value::real(-v.f);
                if (v.kind == value::INT && v.i == INT64_MIN) return fail(line, "integer overflow in -({})", v.i);
                return value::integer(v.kind == value::INT ? -v.i : -int64_t(v.b));
            }
            case expr::NOT: {
                GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[0], line));
                return value::boolean(!truthy(v));
            }
            case expr::AND:
            case expr::OR: {  // Python semantics: the deciding operand itself
                GPTQ_ASSIGN_OR_RETURN(value a, eval(*e.args[0], line));
                if (truthy(a) == (e.kind == expr::OR)) return a;
                return eval(*e.args[1], line);
            }
            case expr::COND: {
                GPTQ_ASSIGN_OR_RETURN(value c, eval(*e.args[0], line));
                if (truthy(c)) return eval(*e.args[1], line);
                return e.args[2] ? eval(*e.args[2], line) : result<value>(value{});
            }
            case expr::BINARY: {
                GPTQ_ASSIGN_OR_RETURN(value a, eval(*e.args[0], line));
                GPTQ_ASSIGN_OR_RETURN(value b, eval(*e.args[1], line));
                return binary(e.name, a, b, line);
            }
        }
        return value{};
    }

    result<value> get_item(const value& obj, const value& key, int line, bool attr) {
        if (obj.kind == value::UNDEFINED || obj.kind == value::NONE)
            return fail(line, "'{}' of an undefined or none value", to_string(key));
        if (obj.kind == value::DICT) {
            if (key.kind == value::STRING)
                if (const value* v = obj.get(key.s)) return *v;
            return value{};
        }
        if ((obj.kind == value::LIST || obj.kind == value::STRING) && key.kind == value::INT) {
            GPTQ_ASSIGN_OR_RETURN(value_list items, iterate(obj, line));  // code points of a string
            const int64_t n = static_cast<int64_t>(items.size());
            const int64_t i = key.i < 0 ? key.i + n : key.i;
            if (i < 0 || i >= n) return value{};
            return items[static_cast<size_t>(i)];
        }
        if (attr) return value{};  // methods are looked up by eval_call
        return fail(line, "cannot index a {} with a {}", kind_name(obj), kind_name(key));
    }

    result<value> eval_slice(const expr& e, int line) {
        GPTQ_ASSIGN_OR_RETURN(value obj, eval(*e.args[0], line));
        std::array<std::optional<int64_t>, 3> part;
        for (size_t k = 0; k < 3; ++k) {
            if (!e.args[k + 1]) continue;
            GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[k + 1], line));
            if (v.kind == value::NONE) continue;
            if (v.kind != value::INT) return fail(line, "slice bound is a {}", kind_name(v));
            part[k] = v.i;
        }
        value_list src;  // strings slice by code point, as Python's str
        if (obj.kind == value::LIST || obj.kind == value::STRING) {
            GPTQ_ASSIGN_OR_RETURN(src, iterate(obj, line));
        } else {
            return fail(line, "cannot slice a {}", kind_name(obj));
        }
        const int64_t n    = static_cast<int64_t>(src.size());
        const int64_t step = part[2].value_or(1);
        if (step == 0) return fail(line, "slice step is 0");
        auto clamp = [&](std::optional<int64_t> x, int64_t dflt) {
            if (!x) return dflt;
            int64_t v = *x < 0 ? *x + n : *x;
            return step > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
        };
        const int64_t a = clamp(part[0], step > 0 ? 0 : n - 1), b = clamp(part[1], step > 0 ? n : -1);
        value_list    out;
        for (int64_t i = a; step > 0 ? i < b : i > b; i += step) out.push_back(src[static_cast<size_t>(i)]);
        if (obj.kind == value::STRING) {
            std::string s;
            for (auto& v : out) s += v.s;
            return value::str(s);
        }
        return value::make_list(std::move(out));
    }

    result<std::vector<value>> eval_args(const expr& e, size_t first, int line) {
        std::vector<value> out;
        for (size_t k = first; k < e.args.size(); ++k) {
            GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[k], line));
            out.push_back(v);
        }
        return out;
    }

    static std::string strip_chars(const std::string& s, const std::string& chars, bool left, bool right) {
        size_t a = 0, b = s.size();
        auto   in = [&](char c) {
            return chars.empty() ? is_space(c) || c == '\v' || c == '\f' : chars.find(c) != std::string::npos;
        };
        if (left)
            while (a < b && in(s[a])) ++a;
        if (right)
            while (b > a && in(s[b - 1])) --b;
        return s.substr(a, b - a);
    }

    result<value> eval_call(const expr& e, int line) {
        const expr& callee = *e.args[0];
        GPTQ_ASSIGN_OR_RETURN(auto args, eval_args(e, 1, line));
        if (callee.kind == expr::NAME) {
            const std::string& f = callee.name;
            if (f == "raise_exception")
                return make_error(E_TMPL, "chat template raised an error: {}", args.empty() ? "" : to_string(args[0]));
            if (f == "namespace") {
                value ns        = value::make_dict();
                ns.is_namespace = true;
                for (const auto& [k, a] : e.kwargs) {
                    GPTQ_ASSIGN_OR_RETURN(value v, eval(*a, line));
                    if (holds_namespace(v)) return fail(line, "a namespace cannot hold a namespace");
                    ns.depth = std::max(ns.depth, v.depth + 1);
                    ns.dict->emplace_back(k, v);
                }
                return ns;
            }
            if (f == "range") {
                if (args.empty() || args.size() > 3) return fail(line, "range() takes 1 to 3 arguments");
                for (auto& a : args)
                    if (a.kind != value::INT) return fail(line, "range() argument is a {}", kind_name(a));
                int64_t a = args.size() > 1 ? args[0].i : 0, b = args.size() > 1 ? args[1].i : args[0].i,
                        s = args.size() > 2 ? args[2].i : 1;
                if (s == 0) return fail(line, "range() step is 0");
                value_list out;
                // Item count in 128 bits: b - a and the step can each span the whole int64 range.
                const __int128 A = a, B = b, S = s;
                const __int128 n = S > 0 ? (B > A ? (B - A + S - 1) / S : 0) : (A > B ? (A - B - S - 1) / -S : 0);
                if (n > k_max_items)
                    return fail(line, "range() of {} items (more than {})", static_cast<double>(n), k_max_items);
                for (int64_t k = 0; k < static_cast<int64_t>(n); ++k) out.push_back(value::integer(a + k * s));
                return value::make_list(std::move(out));
            }
            if (f == "strftime_now") {
                if (args.size() != 1 || args[0].kind != value::STRING)
                    return fail(line, "strftime_now(format) needs a string");
                std::time_t now = std::time(nullptr);
                std::tm     tm{};
                localtime_r(&now, &tm);
                char         buf[256];
                const size_t n = std::strftime(buf, sizeof buf, args[0].s.c_str(), &tm);
                return value::str(std::string(buf, n));
            }
            return make_error(E_UNSUP, "chat template: unsupported function '{}' at line {}", f, line);
        }
        if (callee.kind != expr::ATTR) return fail(line, "only functions and methods can be called");
        GPTQ_ASSIGN_OR_RETURN(value obj, eval(*callee.args[0], line));
        const std::string& m       = callee.name;
        auto               str_arg = [&](size_t k) -> result<std::string> {
            if (k >= args.size() || args[k].kind != value::STRING) return fail(line, "{}() needs a string argument", m);
            return args[k].s;
        };
        if (obj.kind == value::STRING) {
            const std::string& s = obj.s;
            if (m == "strip" || m == "lstrip" || m == "rstrip") {
                std::string chars;
                if (!args.empty() && args[0].kind != value::NONE) {
                    GPTQ_ASSIGN_OR_RETURN(chars, str_arg(0));
                }
                return value::str(strip_chars(s, chars, m != "rstrip", m != "lstrip"));
            }
            if (m == "upper" || m == "lower") {
                std::string r = s;
                for (char& c : r)
                    c = static_cast<char>(m == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                       : std::tolower(static_cast<unsigned char>(c)));
                return value::str(r);
            }
            if (m == "startswith" || m == "endswith") {
                GPTQ_ASSIGN_OR_RETURN(std::string x, str_arg(0));
                const bool r = m == "startswith"
                                   ? s.compare(0, x.size(), x) == 0
                                   : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
                return value::boolean(r);
            }
            if (m == "replace") {
                GPTQ_ASSIGN_OR_RETURN(std::string a, str_arg(0));
                GPTQ_ASSIGN_OR_RETURN(std::string b, str_arg(1));
                if (a.empty()) return fail(line, "replace() of an empty string");
                std::string r;
                size_t      i = 0, j;
                while ((j = s.find(a, i)) != std::string::npos) r += s.substr(i, j - i) + b, i = j + a.size();
                return value::str(r + s.substr(i));
            }
            if (m == "split") {
                value_list out;
                if (args.empty() || args[0].kind == value::NONE) {
                    size_t i = 0;
                    while (i < s.size()) {
                        while (i < s.size() && is_space(s[i])) ++i;
                        size_t j = i;
                        while (j < s.size() && !is_space(s[j])) ++j;
                        if (j > i) out.push_back(value::str(s.substr(i, j - i)));
                        i = j;
                    }
                } else {
                    GPTQ_ASSIGN_OR_RETURN(std::string sep, str_arg(0));
                    if (sep.empty()) return fail(line, "split() with an empty separator");
                    size_t i = 0, j;
                    while ((j = s.find(sep, i)) != std::string::npos)
                        out.push_back(value::str(s.substr(i, j - i))), i = j + sep.size();
                    out.push_back(value::str(s.substr(i)));
                }
                return value::make_list(std::move(out));
            }
        }
        if (obj.kind == value::DICT && !obj.is_namespace) {
            if (m == "items" || m == "keys" || m == "values") {
                value_list out;
                for (auto& [k, v] : *obj.dict)
                    out.push_back(m == "items"  ? value::make_list({value::str(k), v})
                                  : m == "keys" ? value::str(k)
                                                : v);
                return value::make_list(std::move(out));
            }
            if (m == "get") {
                GPTQ_ASSIGN_OR_RETURN(std::string k, str_arg(0));
                if (const value* v = obj.get(k)) return *v;
                return args.size() > 1 ? args[1] : value::none();
            }
        }
        return make_error(E_UNSUP, "chat template: unsupported method '{}' of a {} at line {}", m, kind_name(obj),
                          line);
    }

    result<value> eval_filter(const expr& e, int line) {
        GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[0], line));
        GPTQ_ASSIGN_OR_RETURN(auto args, eval_args(e, 1, line));
        const std::string& f = e.name;
        if (f == "trim") return value::str(strip_chars(to_string(v), "", true, true));
        if (f == "upper" || f == "lower") {
            std::string r = to_string(v);
            for (char& c : r)
                c = static_cast<char>(f == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                   : std::tolower(static_cast<unsigned char>(c)));
            return value::str(r);
        }
        if (f == "capitalize") {
            std::string r = to_string(v);
            for (size_t i = 0; i < r.size(); ++i)
                r[i] = static_cast<char>(i == 0 ? std::toupper(static_cast<unsigned char>(r[i]))
                                                : std::tolower(static_cast<unsigned char>(r[i])));
            return value::str(r);
        }
        if (f == "string") return value::str(to_string(v));
        if (f == "length" || f == "count") {
            if (v.kind == value::STRING) {
                int64_t n = 0;
                for (unsigned char c : v.s) n += (c & 0xC0) != 0x80;
                return value::integer(n);
            }
            if (v.kind == value::LIST) return value::integer(static_cast<int64_t>(v.list->size()));
            if (v.kind == value::DICT) return value::integer(static_cast<int64_t>(v.dict->size()));
            return fail(line, "length of a {}", kind_name(v));
        }
        if (f == "default" || f == "d") {
            const bool boolean = args.size() > 1 && truthy(args[1]);
            if (v.kind == value::UNDEFINED || (boolean && !truthy(v))) return args.empty() ? value::str("") : args[0];
            return v;
        }
        if (f == "first" || f == "last") {
            GPTQ_ASSIGN_OR_RETURN(value_list items, iterate(v, line));
            if (items.empty()) return value{};
            return f == "first" ? items.front() : items.back();
        }
        if (f == "list") {
            GPTQ_ASSIGN_OR_RETURN(value_list items, iterate(v, line));
            return value::make_list(std::move(items));
        }
        if (f == "join") {
            GPTQ_ASSIGN_OR_RETURN(value_list items, iterate(v, line));
            const std::string sep = args.empty() ? "" : to_string(args[0]);
            std::string       out;
            for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + to_string(items[i]);
            return value::str(out);
        }
        if (f == "items") {
            if (v.kind != value::DICT) return fail(line, "items of a {}", kind_name(v));
            value_list out;
            for (auto& [k, x] : *v.dict) out.push_back(value::make_list({value::str(k), x}));
            return value::make_list(std::move(out));
        }
        if (f == "tojson") {
            int indent = 0;
            for (const auto& [k, a] : e.kwargs)
                if (k == "indent") {
                    GPTQ_ASSIGN_OR_RETURN(value iv, eval(*a, line));
                    indent = json_indent(iv.number());
                }
            if (!args.empty()) indent = json_indent(args[0].number());
            std::string out;
            to_json(v, indent, 0, out);
            return value::str(out);
        }
        return make_error(E_UNSUP, "chat template: unsupported filter '{}' at line {}", f, line);
    }

    result<bool> eval_test(const expr& e, int line) {
        const std::string& t = e.name;
        if (t == "defined" || t == "undefined") {
            GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[0], line));
            return (v.kind != value::UNDEFINED) == (t == "defined");
        }
        GPTQ_ASSIGN_OR_RETURN(value v, eval(*e.args[0], line));
        GPTQ_ASSIGN_OR_RETURN(auto args, eval_args(e, 1, line));
        if (t == "none") return v.kind == value::NONE;
        if (t == "string") return v.kind == value::STRING;
        if (t == "number") return v.kind == value::INT || v.kind == value::FLOAT;
        if (t == "integer") return v.kind == value::INT;
        if (t == "float") return v.kind == value::FLOAT;
        if (t == "boolean") return v.kind == value::BOOL;
        if (t == "true" || t == "false") return v.kind == value::BOOL && v.b == (t == "true");
        if (t == "mapping") return v.kind == value::DICT;
        if (t == "sequence") return v.kind == value::LIST || v.kind == value::STRING || v.kind == value::DICT;
        if (t == "iterable") return v.kind == value::LIST || v.kind == value::STRING || v.kind == value::DICT;
        if (t == "odd" || t == "even") {
            if (v.kind != value::INT) return fail(line, "'{}' test of a {}", t, kind_name(v));
            return (v.i % 2 != 0) == (t == "odd");
        }
        if (t == "equalto" || t == "eq" || t == "sameas") {
            if (args.size() != 1) return fail(line, "'{}' test needs one argument", t);
            return equal(v, args[0]);
        }
        return make_error(E_UNSUP, "chat template: unsupported test '{}' at line {}", t, line);
    }

    result<value> binary(const std::string& op, const value& a, const value& b, int line) {
        if (op == "==") return value::boolean(equal(a, b));
        if (op == "!=") return value::boolean(!equal(a, b));
        if (op == "in" || op == "not in") {
            bool r = false;
            if (b.kind == value::STRING) {
                if (a.kind != value::STRING) return fail(line, "'in <string>' needs a string on the left");
                r = b.s.find(a.s) != std::string::npos;
            } else if (b.kind == value::LIST) {
                for (auto& x : *b.list) r = r || equal(a, x);
            } else if (b.kind == value::DICT) {
                r = a.kind == value::STRING && b.get(a.s) != nullptr;
            } else if (b.kind != value::UNDEFINED && b.kind != value::NONE) {
                return fail(line, "'in' a {}", kind_name(b));
            } else {
                return fail(line, "'in' an undefined or none value");
            }
            return value::boolean(r == (op == "in"));
        }
        if (op == "~") return value::str(to_string(a) + to_string(b));
        if (op == "<" || op == ">" || op == "<=" || op == ">=") {
            int c;
            if (a.is_number() && b.is_number())
                c = a.number() < b.number() ? -1 : a.number() > b.number() ? 1 : 0;
            else if (a.kind == value::STRING && b.kind == value::STRING)
                c = a.s.compare(b.s);
            else
                return fail(line, "'{}' between a {} and a {}", op, kind_name(a), kind_name(b));
            return value::boolean(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
        }
        if (op == "+" && a.kind == value::STRING && b.kind == value::STRING) return value::str(a.s + b.s);
        if (op == "+" && a.kind == value::LIST && b.kind == value::LIST) {
            value_list r = *a.list;
            r.insert(r.end(), b.list->begin(), b.list->end());
            return value::make_list(std::move(r));
        }
        if (op == "*" && a.kind == value::STRING && b.kind == value::INT) {
            std::string r;
            if (b.i > 0 && static_cast<double>(a.s.size()) * static_cast<double>(b.i) > k_max_items)
                return fail(line, "string repeated {} times (more than {} bytes)", b.i, k_max_items);
            for (int64_t i = 0; i < b.i; ++i) r += a.s;
            return value::str(r);
        }
        if (!a.is_number() || !b.is_number())
            return fail(line, "'{}' between a {} and a {}", op, kind_name(a), kind_name(b));
        const bool   as_int = a.kind != value::FLOAT && b.kind != value::FLOAT;
        const double x = a.number(), y = b.number();
        if (op == "/") {
            if (y == 0) return fail(line, "division by zero");
            return value::real(x / y);
        }
        if (as_int) {
            // Exact 64-bit integer arithmetic; an overflow is an error (Python would grow the
            // integer, which no chat template needs), never undefined behaviour.
            const int64_t p = a.kind == value::INT ? a.i : a.b, q = b.kind == value::INT ? b.i : b.b;
            int64_t       r = 0;
            if (op == "+" || op == "-" || op == "*") {
                const bool ovf = op == "+"   ? __builtin_add_overflow(p, q, &r)
                                 : op == "-" ? __builtin_sub_overflow(p, q, &r)
                                             : __builtin_mul_overflow(p, q, &r);
                if (ovf) return fail(line, "integer overflow in {} {} {}", p, op, q);
                return value::integer(r);
            }
            if (op == "**") {
                if (q < 0) return value::real(std::pow(x, y));
                if (p == 0 || p == 1) return value::integer(q == 0 ? 1 : p);
                if (p == -1) return value::integer(q % 2 == 0 ? 1 : -1);
                r = 1;  // |p| >= 2: overflows within 63 steps
                for (int64_t k = 0; k < q; ++k)
                    if (__builtin_mul_overflow(r, p, &r)) return fail(line, "integer overflow in {} ** {}", p, q);
                return value::integer(r);
            }
            if (q == 0) return fail(line, "division by zero");
            if (p == INT64_MIN && q == -1) return fail(line, "integer overflow in {} {} {}", p, op, q);
            int64_t d = p / q, m = p % q;
            if (m != 0 && ((m < 0) != (q < 0))) d -= 1, m += q;  // Python floors
            return value::integer(op == "//" ? d : m);
        }
        if (op == "+") return value::real(x + y);
        if (op == "-") return value::real(x - y);
        if (op == "*") return value::real(x * y);
        if (op == "**") return value::real(std::pow(x, y));
        if (y == 0) return fail(line, "division by zero");
        if (op == "//") return value::real(std::floor(x / y));
        return value::real(x - std::floor(x / y) * y);
    }

    std::vector<value> scopes_;
    flow_t             flow_ = FLOW_NONE;
    int64_t            work_ = 0;  // spend(): evaluations + loop iterations so far
};

}  // namespace

result<std::string> chat_template_render(const std::string& tmpl, const std::vector<chat_message>& messages,
                                         const chat_template_vars& vars) {
    GPTQ_ASSIGN_OR_RETURN(auto pieces, lex(tmpl));
    node_list          root;
    stmt_parser        sp(pieces);
    std::string        end;
    std::vector<token> et;
    GPTQ_TRY(sp.parse_block(root, {}, &end, &et, 0, ""));
    value_list msgs;
    for (const auto& m : messages)
        msgs.push_back(value::make_dict({{"role", value::str(m.role)}, {"content", value::str(m.content)}}));
    value       globals = value::make_dict({{"messages", value::make_list(std::move(msgs))},
                                            {"bos_token", value::str(vars.bos_token)},
                                            {"eos_token", value::str(vars.eos_token)},
                                            {"add_generation_prompt", value::boolean(vars.add_generation_prompt)}});
    renderer    r(globals);
    std::string out;
    GPTQ_TRY(r.render(root, out));
    return out;
}

result<std::string> chat_template_file_read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return make_error(status_code::STATUS_NOT_FOUND, "--chat-template {}: cannot open", path);
    std::string text((std::istreambuf_iterator<char>(in)), {});
    if (std::filesystem::path(path).extension() == ".json") {  // a tokenizer_config.json
        auto j = nlohmann::json::parse(text, nullptr, false);
        if (j.is_discarded() || !j.is_object() || !j.contains("chat_template") || !j["chat_template"].is_string())
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "--chat-template {}: a .json file must hold a string \"chat_template\"", path);
        return j["chat_template"].get<std::string>();
    }
    if (text.empty())
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--chat-template {}: the file is empty", path);
    return text;
}

}  // namespace gptq
