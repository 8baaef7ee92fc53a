// UTF-8 helpers for the tokenizers: code point iteration, validation with the Unicode
// "maximal subpart" replacement rule (the one Python's errors="replace" and Rust's
// from_utf8_lossy follow), and GPT-2's byte <-> printable character map.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace gptq {

inline constexpr std::string_view utf8_replacement = "\xEF\xBF\xBD";  // U+FFFD

void utf8_append(std::string& out, uint32_t cp);

// Length of the valid UTF-8 sequence starting at s[i], or 0 if s[i] does not start one.
// On 0, *n_invalid gets the length of the maximal invalid subpart (>= 1) to replace.
size_t utf8_valid_len(std::string_view s, size_t i, size_t* n_invalid);

// Decode the (valid) sequence at s[i]; advances i. Precondition: the input is valid UTF-8.
uint32_t utf8_next(std::string_view s, size_t& i);

bool utf8_is_valid(std::string_view s);

// s with every maximal invalid subsequence replaced by U+FFFD.
std::string utf8_sanitize(std::string_view s);

// Number of trailing bytes of s that form an incomplete (but so far valid) sequence.
size_t utf8_incomplete_tail(std::string_view s);

// GPT-2 bytes_to_unicode: each byte maps to one printable code point. Bytes 33-126, 161-172 and
// 174-255 map to themselves; the other 68 bytes to U+0100 + n in increasing byte order.
struct byte_level_map {
    std::array<std::string, 256> byte_to_str;  // UTF-8 of the mapped code point
    std::array<int16_t, 512>     cp_to_byte;   // inverse for code points < 512; -1 if none
    byte_level_map();
    static const byte_level_map& get();
};

}  // namespace gptq
