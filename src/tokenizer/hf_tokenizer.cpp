// The HF `tokenizers` pipeline for tokenizer.json files (and GPT-2 vocab.json + merges.txt):
//   added tokens (split out first) -> normalizer -> pre-tokenizer -> BPE -> post-processor,
//   and for decoding: ids -> token strings -> decoder chain -> joined text.
// Each component supported is one case below; any other type is an error naming it.
// The behaviours (split semantics, Metaspace prepend rules, ByteFallback's one U+FFFD per bad
// byte, Strip per token, ...) follow the HF documentation and were checked against HF outputs by
// the golden tests (tests/data/tokenizer, scripts/make_tokenizer_goldens.py).
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "core/log.h"
#include "tokenizer/bpe.h"
#include "tokenizer/loaders.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode_nfc.h"
#include "tokenizer/utf8.h"

namespace gptq {

using json = nlohmann::json;

namespace {

// The split regex of GPT-2's ByteLevel pre-tokenizer (use_regex=true).
constexpr const char* gpt2_split_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct added_token {
    int32_t     id = -1;
    std::string content;  // what is matched (normalized tokens: the normalized content)
    bool        lstrip     = false;
    bool        rstrip     = false;
    bool        normalized = false;
    bool        special    = false;
};

enum class norm_kind { NORM_PREPEND, NORM_REPLACE, NORM_REPLACE_REGEX, NORM_NFC, NORM_STRIP };
struct norm_step {
    norm_kind                    kind = norm_kind::NORM_PREPEND;
    std::string                  a = {}, b = {};  // prepend: a; replace: a -> b
    std::shared_ptr<split_regex> re   = {};
    bool                         left = false, right = false;
};

enum class split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_WITH_PREVIOUS,
    SPLIT_MERGED_WITH_NEXT,
    SPLIT_CONTIGUOUS
};
enum class prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
enum class pre_kind { PRE_SPLIT, PRE_BYTE_LEVEL, PRE_METASPACE };
struct pre_step {
    pre_kind                     kind             = pre_kind::PRE_SPLIT;
    std::shared_ptr<split_regex> re               = {};  // split (regex) / byte-level with use_regex
    std::string                  literal          = {};  // split with a String pattern
    split_behavior               behavior         = split_behavior::SPLIT_ISOLATED;
    bool                         invert           = false;
    bool                         add_prefix_space = false;
    std::string                  replacement      = {};  // metaspace
    prepend_scheme               scheme           = prepend_scheme::PREPEND_ALWAYS;
    bool                         split            = false;
};

enum class dec_kind { DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_BYTE_LEVEL, DEC_METASPACE };
struct dec_step {
    dec_kind       kind = dec_kind::DEC_FUSE;
    std::string    a = {}, b = {};  // replace a -> b; strip: a is the content char
    int            start = 0, stop = 0;
    prepend_scheme scheme = prepend_scheme::PREPEND_ALWAYS;
};

struct piece {
    std::string text;
    bool        at_origin;  // starts at offset 0 of the original input (Metaspace "first")
};

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
    if (from.empty()) return std::string(s);
    std::string out;
    out.reserve(s.size());
    size_t pos = 0;
    for (;;) {
        const size_t hit = s.find(from, pos);
        if (hit == std::string_view::npos) break;
        out.append(s.substr(pos, hit - pos));
        out.append(to);
        pos = hit + from.size();
    }
    out.append(s.substr(pos));
    return out;
}

// Unicode White_Space (what Rust's char::is_whitespace tests).
bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point ending just before byte i (valid UTF-8), and its start.
uint32_t prev_code_point(std::string_view s, size_t i, size_t* start) {
    size_t b = i - 1;
    while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
    *start     = b;
    size_t pos = b;
    return utf8_next(s, pos);
}

// Apply a split behaviour to the spans of `s` given the match ranges; appends non-empty pieces.
void split_by_matches(const piece& p, const std::vector<std::pair<size_t, size_t>>& hits, split_behavior behavior,
                      bool invert, std::vector<piece>& out) {
    struct span {
        size_t b, e;
        bool   m;
    };
    std::vector<span> spans;
    size_t            prev = 0;
    for (auto [b, e] : hits) {
        if (b > prev) spans.push_back({prev, b, false});
        spans.push_back({b, e, true});
        prev = e;
    }
    if (prev < p.text.size() || spans.empty()) spans.push_back({prev, p.text.size(), false});
    if (invert)
        for (auto& sp : spans) sp.m = !sp.m;

    std::vector<std::pair<size_t, size_t>> kept;
    bool                                   previous_match = false;
    switch (behavior) {
        case split_behavior::SPLIT_ISOLATED:
            for (auto& sp : spans) kept.emplace_back(sp.b, sp.e);
            break;
        case split_behavior::SPLIT_REMOVED:
            for (auto& sp : spans)
                if (!sp.m) kept.emplace_back(sp.b, sp.e);
            break;
        case split_behavior::SPLIT_MERGED_WITH_PREVIOUS:
            for (auto& sp : spans) {
                if (sp.m && !previous_match && !kept.empty())
                    kept.back().second = sp.e;
                else
                    kept.emplace_back(sp.b, sp.e);
                previous_match = sp.m;
            }
            break;
        case split_behavior::SPLIT_MERGED_WITH_NEXT:
            for (size_t k = spans.size(); k-- > 0;) {
                const auto& sp = spans[k];
                if (sp.m && !previous_match && !kept.empty())
                    kept.back().first = sp.b;
                else
                    kept.emplace_back(sp.b, sp.e);
                previous_match = sp.m;
            }
            std::reverse(kept.begin(), kept.end());
            break;
        case split_behavior::SPLIT_CONTIGUOUS:
            for (auto& sp : spans) {
                if (sp.m == previous_match && !kept.empty())
                    kept.back().second = sp.e;
                else
                    kept.emplace_back(sp.b, sp.e);
                previous_match = sp.m;
            }
            break;
    }
    for (auto [b, e] : kept)
        if (e > b) out.push_back({p.text.substr(b, e - b), p.at_origin && b == 0});
}

std::vector<std::pair<size_t, size_t>> find_literal(std::string_view s, std::string_view lit) {
    std::vector<std::pair<size_t, size_t>> hits;
    if (lit.empty()) return hits;
    for (size_t pos = s.find(lit); pos != std::string_view::npos; pos = s.find(lit, pos + lit.size()))
        hits.emplace_back(pos, pos + lit.size());
    return hits;
}

// ---- JSON reading with messages that name the component -------------------------------------

std::string quote(const json& v) {
    std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return s;
}

result<std::string> get_string(const json& obj, const char* key, const std::string& where) {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_string())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: '{}' must be a string, got {}", where, key,
                          it == obj.end() ? std::string("nothing") : quote(*it));
    return it->get<std::string>();
}

bool get_bool_or(const json& obj, const char* key, bool def) {
    auto it = obj.find(key);
    return it != obj.end() && it->is_boolean() ? it->get<bool>() : def;
}

// A Split/Replace "pattern": {"String": s} or {"Regex": r}.
struct pattern_spec {
    bool        is_regex = false;
    std::string text;
};
result<pattern_spec> get_pattern(const json& obj, const std::string& where) {
    auto it = obj.find("pattern");
    if (it != obj.end() && it->is_object()) {
        if (it->contains("String") && (*it)["String"].is_string()) return pattern_spec{false, (*it)["String"]};
        if (it->contains("Regex") && (*it)["Regex"].is_string()) return pattern_spec{true, (*it)["Regex"]};
    }
    return make_error(status_code::STATUS_PARSE_ERROR,
                      "{}: 'pattern' must be {{\"String\": ...}} or {{\"Regex\": ...}}, got {}", where,
                      it == obj.end() ? std::string("nothing") : quote(*it));
}

result<prepend_scheme> get_prepend_scheme(const json& obj, const std::string& where) {
    auto it = obj.find("prepend_scheme");
    if (it == obj.end() || it->is_null()) {  // older files: add_prefix_space
        return get_bool_or(obj, "add_prefix_space", true) ? prepend_scheme::PREPEND_ALWAYS
                                                          : prepend_scheme::PREPEND_NEVER;
    }
    const std::string s = it->is_string() ? it->get<std::string>() : "";
    if (s == "always") return prepend_scheme::PREPEND_ALWAYS;
    if (s == "first") return prepend_scheme::PREPEND_FIRST;
    if (s == "never") return prepend_scheme::PREPEND_NEVER;
    return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported prepend_scheme {}", where, quote(*it));
}

result<std::string> get_single_char(const json& obj, const char* key, const std::string& where) {
    GPTQ_ASSIGN_OR_RETURN(std::string s, get_string(obj, key, where));
    size_t i = 0;
    if (s.empty() || !utf8_is_valid(s) || (utf8_next(s, i), i != s.size()))
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: '{}' must be one character, got '{}'", where, key, s);
    return s;
}

// ---- the tokenizer ------------------------------------------------------------------------------

class hf_tokenizer final : public tokenizer {
public:
    bpe_model                        model;
    std::vector<added_token>         added;       // all added tokens
    std::vector<added_token>         raw_match;   // normalized == false: matched on raw text
    std::vector<added_token>         norm_match;  // normalized == true: matched after normalizing
    std::vector<norm_step>           normalizers;
    std::vector<pre_step>            pre_tokenizers;
    std::vector<dec_step>            decoders;
    bool                             has_decoder        = false;
    bool                             has_post_processor = false;
    std::vector<int32_t>             template_prefix, template_suffix;  // around sequence A
    std::unordered_map<int32_t, int> added_index;                       // id -> index in `added`

    std::vector<int32_t> encode(std::string_view text, bool add_special) const override;
    std::string          decode(const std::vector<int32_t>& ids, bool skip_special) const override;
    std::string          id_to_piece(int32_t id) const override;
    int32_t              piece_to_id(std::string_view piece) const override;
    bool                 is_special(int32_t id) const override {
        auto it = added_index.find(id);
        return it != added_index.end() && added[it->second].special;
    }

    void set_kind(tokenizer_kind k) { kind_ = k; }

    status finish_setup(const std::string& where) {
        int32_t max_id = static_cast<int32_t>(model.id_to_token.size()) - 1;
        for (size_t k = 0; k < added.size(); ++k) {
            added_index[added[k].id] = static_cast<int>(k);
            max_id                   = std::max(max_id, added[k].id);
        }
        vocab_size_ = max_id + 1;
        model.finish_setup();
        // Longest first, so that the first hit at a position is the longest (leftmost-longest).
        auto by_len = [](const added_token& x, const added_token& y) { return x.content.size() > y.content.size(); };
        std::stable_sort(raw_match.begin(), raw_match.end(), by_len);
        std::stable_sort(norm_match.begin(), norm_match.end(), by_len);
        for (const auto* ids : {&template_prefix, &template_suffix})
            for (int32_t id : *ids)
                if (id < 0 || id >= vocab_size_)
                    return make_error(status_code::STATUS_PARSE_ERROR, "{}: post_processor id {} is not in the vocab",
                                      where, id);
        adds_bos_ = !template_prefix.empty();
        if (adds_bos_) bos_id_ = template_prefix[0];
        return status::ok();
    }

    std::string normalize(std::string_view s) const;

protected:
    void on_config() override {
        // Without a post-processor the file says nothing about BOS/EOS; then tokenizer_config.json
        // decides, as transformers' Llama fast tokenizer does.
        if (has_post_processor) return;
        if (config_.add_bos_token.value_or(false) && bos_id_ >= 0) template_prefix = {bos_id_};
        if (config_.add_eos_token.value_or(false) && !eos_ids_.empty()) template_suffix = {eos_ids_[0]};
    }

private:
    struct segment {
        std::string text;
        int32_t     token = -1;  // >= 0: an added token
        bool        at_origin;
    };
    void split_added(const std::vector<added_token>& toks, const segment& in, std::vector<segment>& out) const;
    void pre_tokenize(std::vector<piece>& pieces) const;
};

// Leftmost-longest matching of added tokens, with lstrip/rstrip swallowing whitespace next to a
// match (not past the previous match).
void hf_tokenizer::split_added(const std::vector<added_token>& toks, const segment& in,
                               std::vector<segment>& out) const {
    if (toks.empty() || in.token >= 0) {
        out.push_back(in);
        return;
    }
    const std::string_view s = in.text;
    // First bytes that can start a token, to skip positions fast.
    bool first_byte[256] = {};
    for (const auto& t : toks)
        if (!t.content.empty()) first_byte[static_cast<uint8_t>(t.content[0])] = true;

    size_t emitted = 0;  // s[0, emitted) is already in `out`
    size_t pos     = 0;
    while (pos < s.size()) {
        const added_token* hit = nullptr;
        if (first_byte[static_cast<uint8_t>(s[pos])]) {
            for (const auto& t : toks) {
                if (!t.content.empty() && s.compare(pos, t.content.size(), t.content) == 0) {
                    hit = &t;
                    break;
                }
            }
        }
        if (!hit) {
            ++pos;
            continue;
        }
        size_t b = pos, e = pos + hit->content.size();
        if (hit->lstrip) {
            while (b > emitted) {
                size_t         start = 0;
                const uint32_t c     = prev_code_point(s, b, &start);
                if (!is_white_space(c)) break;
                b = start;
            }
        }
        if (hit->rstrip) {
            while (e < s.size()) {
                size_t         next = e;
                const uint32_t c    = utf8_next(s, next);
                if (!is_white_space(c)) break;
                e = next;
            }
        }
        if (b > emitted) out.push_back({std::string(s.substr(emitted, b - emitted)), -1, in.at_origin && emitted == 0});
        out.push_back({std::string(), hit->id, false});
        emitted = pos = e;
    }
    if (emitted < s.size() || out.empty())
        out.push_back({std::string(s.substr(emitted)), -1, in.at_origin && emitted == 0});
}

std::string hf_tokenizer::normalize(std::string_view in) const {
    std::string s(in);
    for (const auto& n : normalizers) {
        switch (n.kind) {
            case norm_kind::NORM_PREPEND:
                if (!s.empty()) s = n.a + s;
                break;
            case norm_kind::NORM_REPLACE:
                s = replace_all(s, n.a, n.b);
                break;
            case norm_kind::NORM_REPLACE_REGEX: {
                std::string out;
                size_t      prev = 0;
                for (auto [b, e] : n.re->find_all(s)) {
                    out.append(s, prev, b - prev);
                    out.append(n.b);
                    prev = e;
                }
                out.append(s, prev, std::string::npos);
                s = std::move(out);
                break;
            }
            case norm_kind::NORM_NFC:
                s = unicode_nfc(s);
                break;
            case norm_kind::NORM_STRIP: {
                size_t b = 0, e = s.size();
                if (n.left) {
                    while (b < e) {
                        size_t next = b;
                        if (!is_white_space(utf8_next(s, next))) break;
                        b = next;
                    }
                }
                if (n.right) {
                    while (e > b) {
                        size_t start = 0;
                        if (!is_white_space(prev_code_point(s, e, &start))) break;
                        e = start;
                    }
                }
                s = s.substr(b, e - b);
                break;
            }
        }
    }
    return s;
}

void hf_tokenizer::pre_tokenize(std::vector<piece>& pieces) const {
    const byte_level_map& bl = byte_level_map::get();
    for (const auto& step : pre_tokenizers) {
        std::vector<piece> next;
        next.reserve(pieces.size());
        for (auto& p : pieces) {
            switch (step.kind) {
                case pre_kind::PRE_SPLIT: {
                    auto hits = step.re ? step.re->find_all(p.text) : find_literal(p.text, step.literal);
                    split_by_matches(p, hits, step.behavior, step.invert, next);
                    break;
                }
                case pre_kind::PRE_BYTE_LEVEL: {
                    std::vector<piece> parts;
                    if (step.add_prefix_space && (p.text.empty() || p.text[0] != ' ')) p.text = " " + p.text;
                    if (step.re)
                        split_by_matches(p, step.re->find_all(p.text), split_behavior::SPLIT_ISOLATED, false, parts);
                    else if (!p.text.empty())
                        parts.push_back(p);
                    for (auto& q : parts) {
                        std::string mapped;
                        mapped.reserve(q.text.size() * 2);
                        for (char c : q.text) mapped += bl.byte_to_str[static_cast<uint8_t>(c)];
                        next.push_back({std::move(mapped), q.at_origin});
                    }
                    break;
                }
                case pre_kind::PRE_METASPACE: {
                    piece      q{replace_all(p.text, " ", step.replacement), p.at_origin};
                    const bool starts = q.text.compare(0, step.replacement.size(), step.replacement) == 0;
                    if (!starts && (step.scheme == prepend_scheme::PREPEND_ALWAYS ||
                                    (step.scheme == prepend_scheme::PREPEND_FIRST && q.at_origin)))
                        q.text.insert(0, step.replacement);
                    if (step.split)
                        split_by_matches(q, find_literal(q.text, step.replacement),
                                         split_behavior::SPLIT_MERGED_WITH_NEXT, false, next);
                    else if (!q.text.empty())
                        next.push_back(std::move(q));
                    break;
                }
            }
        }
        pieces = std::move(next);
    }
}

std::vector<int32_t> hf_tokenizer::encode(std::string_view text_in, bool add_special) const {
    const std::string    text = utf8_is_valid(text_in) ? std::string(text_in) : utf8_sanitize(text_in);
    std::vector<int32_t> ids;
    if (add_special) ids = template_prefix;

    std::vector<segment> raw;
    split_added(raw_match, segment{text, -1, true}, raw);
    for (auto& seg : raw) {
        if (seg.token >= 0) {
            ids.push_back(seg.token);
            continue;
        }
        std::vector<segment> segs;
        split_added(norm_match, segment{normalize(seg.text), -1, seg.at_origin}, segs);
        for (auto& ns : segs) {
            if (ns.token >= 0) {
                ids.push_back(ns.token);
                continue;
            }
            if (ns.text.empty()) continue;
            std::vector<piece> pieces{{std::move(ns.text), ns.at_origin}};
            pre_tokenize(pieces);
            for (const auto& p : pieces) model.encode_word(p.text, ids);
        }
    }
    if (add_special) ids.insert(ids.end(), template_suffix.begin(), template_suffix.end());
    return ids;
}

std::string hf_tokenizer::id_to_piece(int32_t id) const {
    auto it = added_index.find(id);
    if (it != added_index.end()) return added[it->second].content;
    if (id >= 0 && id < static_cast<int32_t>(model.id_to_token.size())) return model.id_to_token[id];
    return {};
}

int32_t hf_tokenizer::piece_to_id(std::string_view p) const {
    for (const auto& t : added)
        if (t.content == p) return t.id;
    return model.find(p);
}

std::string hf_tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
        if (id < 0 || id >= vocab_size_) continue;
        if (skip_special && is_special(id)) continue;
        auto it = added_index.find(id);
        if (it != added_index.end())
            toks.push_back(added[it->second].content);
        else if (id < static_cast<int32_t>(model.id_to_token.size()) && !model.id_to_token[id].empty())
            toks.push_back(model.id_to_token[id]);  // ids past the model's table that no added token
                                                    // covers (a gap below a high added id) decode to nothing
    }
    if (!has_decoder) {
        std::string out;
        for (size_t k = 0; k < toks.size(); ++k) {
            if (k) out += ' ';
            out += toks[k];
        }
        return out;
    }
    const byte_level_map& bl = byte_level_map::get();
    for (const auto& d : decoders) {
        switch (d.kind) {
            case dec_kind::DEC_REPLACE:
                for (auto& t : toks) t = replace_all(t, d.a, d.b);
                break;
            case dec_kind::DEC_FUSE: {
                std::string all;
                for (auto& t : toks) all += t;
                toks.assign(1, std::move(all));
                break;
            }
            case dec_kind::DEC_BYTE_FALLBACK: {
                std::vector<std::string> out;
                std::string              bytes;
                size_t                   n_bytes = 0;
                auto                     flush   = [&] {
                    if (n_bytes == 0) return;
                    if (utf8_is_valid(bytes)) {
                        out.push_back(bytes);
                    } else {
                        for (size_t k = 0; k < n_bytes; ++k) out.emplace_back(utf8_replacement);
                    }
                    bytes.clear();
                    n_bytes = 0;
                };
                for (auto& t : toks) {
                    unsigned   v       = 0;
                    const bool is_byte = t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
                                         std::isxdigit(static_cast<uint8_t>(t[3])) &&
                                         std::isxdigit(static_cast<uint8_t>(t[4])) &&
                                         std::sscanf(t.c_str() + 3, "%2x", &v) == 1;
                    if (is_byte) {
                        bytes.push_back(static_cast<char>(v));
                        ++n_bytes;
                    } else {
                        flush();
                        out.push_back(std::move(t));
                    }
                }
                flush();
                toks = std::move(out);
                break;
            }
            case dec_kind::DEC_STRIP:
                for (auto& t : toks) {
                    std::vector<std::pair<size_t, size_t>> cps;  // byte ranges of code points
                    for (size_t i = 0; i < t.size();) {
                        size_t b = i;
                        utf8_next(t, i);
                        cps.emplace_back(b, i);
                    }
                    auto is_content = [&](size_t k) {
                        return t.compare(cps[k].first, cps[k].second - cps[k].first, d.a) == 0;
                    };
                    size_t lo = 0, hi = cps.size();
                    for (int k = 0; k < d.start && lo < hi && is_content(lo); ++k) ++lo;
                    for (int k = 0; k < d.stop && hi > lo && is_content(hi - 1); ++k) --hi;
                    t = lo < hi ? t.substr(cps[lo].first, cps[hi - 1].second - cps[lo].first) : std::string();
                }
                break;
            case dec_kind::DEC_BYTE_LEVEL: {
                std::string bytes;
                for (auto& t : toks) {
                    std::string mapped;
                    bool        ok = true;
                    for (size_t i = 0; i < t.size() && ok;) {
                        const uint32_t cp = utf8_next(t, i);
                        if (cp < 512 && bl.cp_to_byte[cp] >= 0)
                            mapped.push_back(static_cast<char>(bl.cp_to_byte[cp]));
                        else
                            ok = false;
                    }
                    bytes += ok ? mapped : t;
                }
                toks.assign(1, utf8_sanitize(bytes));
                break;
            }
            case dec_kind::DEC_METASPACE:
                for (size_t k = 0; k < toks.size(); ++k) {
                    std::string out;
                    for (size_t i = 0; i < toks[k].size();) {
                        const size_t b = i;
                        utf8_next(toks[k], i);
                        if (toks[k].compare(b, i - b, d.a) == 0) {
                            if (!(k == 0 && d.scheme != prepend_scheme::PREPEND_NEVER)) out += ' ';
                        } else {
                            out.append(toks[k], b, i - b);
                        }
                    }
                    toks[k] = std::move(out);
                }
                break;
        }
    }
    std::string out;
    for (auto& t : toks) out += t;
    return out;
}

// ---- building from JSON -----------------------------------------------------------------------

status parse_normalizer(const json& n, const std::string& where, std::vector<norm_step>& out) {
    if (n.is_null()) return status::ok();
    if (!n.is_object() || !n.contains("type") || !n["type"].is_string())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: normalizer without a 'type': {}", where, quote(n));
    const std::string type = n["type"];
    const std::string w    = where + ": normalizer " + type;
    if (type == "Sequence") {
        if (!n.contains("normalizers") || !n["normalizers"].is_array())
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'normalizers' must be a list", w);
        for (const auto& sub : n["normalizers"]) GPTQ_TRY(parse_normalizer(sub, where, out));
    } else if (type == "Prepend") {
        GPTQ_ASSIGN_OR_RETURN(std::string p, get_string(n, "prepend", w));
        out.push_back({norm_kind::NORM_PREPEND, p, "", nullptr});
    } else if (type == "Replace") {
        GPTQ_ASSIGN_OR_RETURN(pattern_spec pat, get_pattern(n, w));
        GPTQ_ASSIGN_OR_RETURN(std::string content, get_string(n, "content", w));
        if (pat.is_regex) {
            GPTQ_ASSIGN_OR_RETURN(auto re, split_regex::compile(pat.text, w));
            out.push_back({norm_kind::NORM_REPLACE_REGEX, pat.text, content, re});
        } else {
            out.push_back({norm_kind::NORM_REPLACE, pat.text, content, nullptr});
        }
    } else if (type == "NFC") {
        out.push_back({norm_kind::NORM_NFC, "", "", nullptr});
    } else if (type == "Strip") {
        norm_step s{norm_kind::NORM_STRIP, "", "", nullptr};
        s.left  = get_bool_or(n, "strip_left", false);
        s.right = get_bool_or(n, "strip_right", false);
        out.push_back(s);
    } else {
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported normalizer type '{}'", where, type);
    }
    return status::ok();
}

status parse_pre_tokenizer(const json& n, const std::string& where, std::vector<pre_step>& out) {
    if (n.is_null()) return status::ok();
    if (!n.is_object() || !n.contains("type") || !n["type"].is_string())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: pre_tokenizer without a 'type': {}", where, quote(n));
    const std::string type = n["type"];
    const std::string w    = where + ": pre_tokenizer " + type;
    if (type == "Sequence") {
        if (!n.contains("pretokenizers") || !n["pretokenizers"].is_array())
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'pretokenizers' must be a list", w);
        for (const auto& sub : n["pretokenizers"]) GPTQ_TRY(parse_pre_tokenizer(sub, where, out));
    } else if (type == "Split") {
        pre_step s{pre_kind::PRE_SPLIT};
        GPTQ_ASSIGN_OR_RETURN(pattern_spec pat, get_pattern(n, w));
        if (pat.is_regex) {
            GPTQ_ASSIGN_OR_RETURN(s.re, split_regex::compile(pat.text, w));
        } else {
            s.literal = pat.text;
        }
        GPTQ_ASSIGN_OR_RETURN(std::string behavior, get_string(n, "behavior", w));
        static const std::map<std::string, split_behavior> behaviors = {
            {"Removed", split_behavior::SPLIT_REMOVED},
            {"Isolated", split_behavior::SPLIT_ISOLATED},
            {"MergedWithPrevious", split_behavior::SPLIT_MERGED_WITH_PREVIOUS},
            {"MergedWithNext", split_behavior::SPLIT_MERGED_WITH_NEXT},
            {"Contiguous", split_behavior::SPLIT_CONTIGUOUS},
        };
        auto it = behaviors.find(behavior);
        if (it == behaviors.end())
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported split behavior '{}'", w, behavior);
        s.behavior = it->second;
        s.invert   = get_bool_or(n, "invert", false);
        out.push_back(std::move(s));
    } else if (type == "ByteLevel") {
        pre_step s{pre_kind::PRE_BYTE_LEVEL};
        s.add_prefix_space = get_bool_or(n, "add_prefix_space", true);
        if (get_bool_or(n, "use_regex", true)) {
            GPTQ_ASSIGN_OR_RETURN(s.re, split_regex::compile(gpt2_split_pattern, w));
        }
        out.push_back(std::move(s));
    } else if (type == "Metaspace") {
        pre_step s{pre_kind::PRE_METASPACE};
        GPTQ_ASSIGN_OR_RETURN(s.replacement, get_single_char(n, "replacement", w));
        GPTQ_ASSIGN_OR_RETURN(s.scheme, get_prepend_scheme(n, w));
        s.split = get_bool_or(n, "split", true);
        out.push_back(std::move(s));
    } else if (type == "Digits") {
        pre_step s{pre_kind::PRE_SPLIT};
        GPTQ_ASSIGN_OR_RETURN(
            s.re, split_regex::compile(get_bool_or(n, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", w));
        out.push_back(std::move(s));
    } else {
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported pre_tokenizer type '{}'", where, type);
    }
    return status::ok();
}

status parse_decoder(const json& n, const std::string& where, std::vector<dec_step>& out) {
    if (n.is_null()) return status::ok();
    if (!n.is_object() || !n.contains("type") || !n["type"].is_string())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: decoder without a 'type': {}", where, quote(n));
    const std::string type = n["type"];
    const std::string w    = where + ": decoder " + type;
    if (type == "Sequence") {
        if (!n.contains("decoders") || !n["decoders"].is_array())
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'decoders' must be a list", w);
        for (const auto& sub : n["decoders"]) GPTQ_TRY(parse_decoder(sub, where, out));
    } else if (type == "Replace") {
        GPTQ_ASSIGN_OR_RETURN(pattern_spec pat, get_pattern(n, w));
        if (pat.is_regex)
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported Regex pattern {}", w, quote(pat.text));
        GPTQ_ASSIGN_OR_RETURN(std::string content, get_string(n, "content", w));
        out.push_back({dec_kind::DEC_REPLACE, pat.text, content});
    } else if (type == "ByteFallback") {
        out.push_back({dec_kind::DEC_BYTE_FALLBACK});
    } else if (type == "Fuse") {
        out.push_back({dec_kind::DEC_FUSE});
    } else if (type == "Strip") {
        dec_step s{dec_kind::DEC_STRIP};
        GPTQ_ASSIGN_OR_RETURN(s.a, get_single_char(n, "content", w));
        auto get_count = [&](const char* key) -> result<int> {
            auto it = n.find(key);
            if (it == n.end() || !it->is_number_unsigned())
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: '{}' must be a count, got {}", w, key,
                                  it == n.end() ? std::string("nothing") : quote(*it));
            return static_cast<int>(std::min<uint64_t>(it->get<uint64_t>(), 1 << 20));
        };
        GPTQ_ASSIGN_OR_RETURN(s.start, get_count("start"));
        GPTQ_ASSIGN_OR_RETURN(s.stop, get_count("stop"));
        out.push_back(s);
    } else if (type == "ByteLevel") {
        out.push_back({dec_kind::DEC_BYTE_LEVEL});
    } else if (type == "Metaspace") {
        dec_step s{dec_kind::DEC_METASPACE};
        GPTQ_ASSIGN_OR_RETURN(s.a, get_single_char(n, "replacement", w));
        GPTQ_ASSIGN_OR_RETURN(s.scheme, get_prepend_scheme(n, w));
        out.push_back(s);
    } else {
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported decoder type '{}'", where, type);
    }
    return status::ok();
}

status parse_post_processor(const json& n, const std::string& where, hf_tokenizer& tok) {
    if (n.is_null()) return status::ok();
    if (!n.is_object() || !n.contains("type") || !n["type"].is_string())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: post_processor without a 'type': {}", where, quote(n));
    const std::string type = n["type"];
    const std::string w    = where + ": post_processor " + type;
    if (type == "Sequence") {
        if (!n.contains("processors") || !n["processors"].is_array())
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'processors' must be a list", w);
        for (const auto& sub : n["processors"]) GPTQ_TRY(parse_post_processor(sub, where, tok));
    } else if (type == "ByteLevel") {
        // Only adjusts offsets; ids are unchanged.
    } else if (type == "TemplateProcessing") {
        if (!tok.template_prefix.empty() || !tok.template_suffix.empty())
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: more than one TemplateProcessing", w);
        if (!n.contains("single") || !n["single"].is_array())
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'single' must be a list", w);
        const json& specials = n.contains("special_tokens") ? n["special_tokens"] : json::object();
        bool        seen_seq = false;
        for (const auto& item : n["single"]) {
            if (item.contains("Sequence")) {
                if (seen_seq) return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'single' has two sequences", w);
                seen_seq = true;
                continue;
            }
            if (!item.contains("SpecialToken") || !item["SpecialToken"].contains("id") ||
                !item["SpecialToken"]["id"].is_string())
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: unknown template item {}", w, quote(item));
            const std::string name = item["SpecialToken"]["id"];
            if (!specials.contains(name) || !specials[name].contains("ids") || !specials[name]["ids"].is_array())
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: special token '{}' is not in special_tokens", w,
                                  name);
            auto& dst = seen_seq ? tok.template_suffix : tok.template_prefix;
            for (const auto& id : specials[name]["ids"]) {
                if (!id.is_number_integer())
                    return make_error(status_code::STATUS_PARSE_ERROR, "{}: id {} of '{}' is not an integer", w,
                                      quote(id), name);
                dst.push_back(id.get<int32_t>());
            }
        }
        if (!seen_seq) return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'single' has no Sequence item", w);
    } else {
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported post_processor type '{}'", where, type);
    }
    tok.has_post_processor = true;
    return status::ok();
}

status parse_bpe_model(const json& m, const std::string& where, bpe_model& model) {
    const std::string w = where + ": model";
    if (!m.is_object())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'model' must be an object, got {}", where, quote(m));
    const std::string type = m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "BPE";
    if (type != "BPE")
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported model type '{}' (only BPE)", where, type);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
        if (m.contains(key) && !m[key].is_null() && !(m[key].is_string() && m[key].get<std::string>().empty()))
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported {} {}", w, key, quote(m[key]));
    }
    if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0.0)
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: unsupported dropout {}", w, quote(m["dropout"]));
    if (!m.contains("vocab") || !m["vocab"].is_object())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'vocab' must be an object", w);
    if (!m.contains("merges") || !m["merges"].is_array())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'merges' must be a list", w);

    const json& vocab  = m["vocab"];
    int64_t     max_id = -1;
    model.vocab.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
        if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= (1 << 30))
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: vocab id of '{}' is {}, not an id", w, it.key(),
                              quote(it.value()));
        const auto id = it.value().get<int64_t>();
        model.vocab.emplace(it.key(), static_cast<int32_t>(id));
        max_id = std::max(max_id, id);
    }
    model.id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
    for (const auto& [tok, id] : model.vocab) model.id_to_token[id] = tok;

    int32_t rank = 0;
    for (const auto& mg : m["merges"]) {
        std::string left, right;
        if (mg.is_string()) {
            const std::string s   = mg;
            const size_t      sep = s.find(' ', 1);  // a merge is "A B"; A may not be empty
            if (sep == std::string::npos || s.find(' ', sep + 1) != std::string::npos)
                return make_error(status_code::STATUS_PARSE_ERROR, "{}: merge {} is not 'A B'", w, quote(mg));
            left  = s.substr(0, sep);
            right = s.substr(sep + 1);
        } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
            left  = mg[0];
            right = mg[1];
        } else {
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: merge {} is not 'A B' or [A, B]", w, quote(mg));
        }
        const int32_t a = model.find(left), b = model.find(right), ab = model.find(left + right);
        if (a < 0 || b < 0 || ab < 0)
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: merge {} uses a token that is not in the vocab", w,
                              quote(mg));
        model.add_merge(a, b, ab, rank++);
    }

    if (m.contains("unk_token") && m["unk_token"].is_string()) {
        const std::string unk = m["unk_token"];
        model.unk_id          = model.find(unk);
        if (model.unk_id < 0)
            return make_error(status_code::STATUS_PARSE_ERROR, "{}: unk_token '{}' is not in the vocab", w, unk);
    }
    model.byte_fallback = get_bool_or(m, "byte_fallback", false);
    model.fuse_unk      = get_bool_or(m, "fuse_unk", false);
    model.ignore_merges = get_bool_or(m, "ignore_merges", false);
    return status::ok();
}

status parse_added_tokens(const json& list, const std::string& where, hf_tokenizer& tok) {
    if (list.is_null()) return status::ok();
    if (!list.is_array())
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: 'added_tokens' must be a list", where);
    for (const auto& a : list) {
        const std::string w = where + ": added token";
        if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
            !a.contains("content") || !a["content"].is_string())
            return make_error(status_code::STATUS_PARSE_ERROR, "{} {} needs an 'id' and a 'content'", w, quote(a));
        added_token t;
        t.id         = a["id"].get<int32_t>();
        t.content    = a["content"];
        t.lstrip     = get_bool_or(a, "lstrip", false);
        t.rstrip     = get_bool_or(a, "rstrip", false);
        t.special    = get_bool_or(a, "special", false);
        t.normalized = get_bool_or(a, "normalized", !t.special);
        if (get_bool_or(a, "single_word", false))
            return make_error(status_code::STATUS_UNSUPPORTED, "{} '{}': unsupported option single_word", w, t.content);
        if (t.content.empty()) return make_error(status_code::STATUS_PARSE_ERROR, "{} {} is empty", w, t.id);
        tok.added.push_back(t);
    }
    return status::ok();
}

}  // namespace

result<std::unique_ptr<tokenizer>> hf_tokenizer_from_json(const json& j, const std::string& where) {
    if (!j.is_object()) return make_error(status_code::STATUS_PARSE_ERROR, "{}: not a JSON object", where);
    auto tok = std::make_unique<hf_tokenizer>();
    if (!j.contains("model"))
        return make_error(status_code::STATUS_PARSE_ERROR, "{}: no 'model' (not a tokenizer.json?)", where);
    for (const char* key : {"truncation", "padding"})
        if (j.contains(key) && !j[key].is_null())
            GPTQ_LOG_DEBUG("{}: '{}' is ignored (encode never truncates or pads)", where, key);
    GPTQ_TRY(parse_bpe_model(j["model"], where, tok->model));
    GPTQ_TRY(parse_added_tokens(j.value("added_tokens", json()), where, *tok));
    GPTQ_TRY(parse_normalizer(j.value("normalizer", json()), where, tok->normalizers));
    GPTQ_TRY(parse_pre_tokenizer(j.value("pre_tokenizer", json()), where, tok->pre_tokenizers));
    GPTQ_TRY(parse_post_processor(j.value("post_processor", json()), where, *tok));
    const json dec   = j.value("decoder", json());
    tok->has_decoder = !dec.is_null();
    GPTQ_TRY(parse_decoder(dec, where, tok->decoders));

    for (auto t : tok->added) {
        if (t.normalized) {
            t.content = tok->normalize(t.content);  // HF matches normalized tokens in normalized text
            tok->norm_match.push_back(t);
        } else {
            tok->raw_match.push_back(t);
        }
    }
    GPTQ_TRY(tok->finish_setup(where));
    tok->set_kind(tokenizer_kind::TOKENIZER_KIND_HF_JSON);
    return std::unique_ptr<tokenizer>(std::move(tok));
}

result<std::unique_ptr<tokenizer>> hf_tokenizer_from_gpt2_files(const std::string& vocab_path,
                                                                const std::string& merges_path) {
    GPTQ_ASSIGN_OR_RETURN(json vocab, tokenizer_read_json(vocab_path, vocab_path));
    GPTQ_ASSIGN_OR_RETURN(std::string merges_text, tokenizer_read_file(merges_path));
    json   merges = json::array();
    size_t pos = 0, line_no = 0;
    while (pos < merges_text.size()) {
        size_t end = merges_text.find('\n', pos);
        if (end == std::string::npos) end = merges_text.size();
        std::string line = merges_text.substr(pos, end - pos);
        pos              = end + 1;
        ++line_no;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
        merges.push_back(line);
    }
    json j = {
        {"model", {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", std::move(merges)}}},
        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
        {"decoder", {{"type", "ByteLevel"}}},
    };
    if (j["model"]["vocab"].is_object() && j["model"]["vocab"].contains("<|endoftext|>")) {
        j["added_tokens"] = json::array({{{"id", j["model"]["vocab"]["<|endoftext|>"]},
                                          {"content", "<|endoftext|>"},
                                          {"special", true},
                                          {"normalized", false}}});
    }
    GPTQ_ASSIGN_OR_RETURN(auto tok, hf_tokenizer_from_json(j, vocab_path + " + merges.txt"));
    static_cast<hf_tokenizer*>(tok.get())->set_kind(tokenizer_kind::TOKENIZER_KIND_GPT2_FILES);
    return tok;
}

}  // namespace gptq
