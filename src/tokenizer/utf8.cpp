#include "tokenizer/utf8.h"

namespace gptq {

void utf8_append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

// Table 3-7 of the Unicode standard (well-formed byte sequences): the lead byte fixes the length
// and the allowed range of the second byte; later bytes are 80..BF.
size_t utf8_valid_len(std::string_view s, size_t i, size_t* n_invalid) {
    const auto b0 = static_cast<uint8_t>(s[i]);
    if (b0 < 0x80) return 1;
    size_t  len = 0;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        len = 3;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        len = 4;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;
    } else {
        if (n_invalid) *n_invalid = 1;
        return 0;
    }
    for (size_t k = 1; k < len; ++k) {
        if (i + k >= s.size()) {
            if (n_invalid) *n_invalid = k;
            return 0;
        }
        const auto b  = static_cast<uint8_t>(s[i + k]);
        const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) {
            if (n_invalid) *n_invalid = k;
            return 0;
        }
    }
    return len;
}

uint32_t utf8_next(std::string_view s, size_t& i) {
    const auto b0 = static_cast<uint8_t>(s[i]);
    if (b0 < 0x80) {
        i += 1;
        return b0;
    }
    size_t   len = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
    uint32_t cp  = b0 & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
    for (size_t k = 1; k < len && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
    i += len;
    return cp;
}

bool utf8_is_valid(std::string_view s) {
    for (size_t i = 0; i < s.size();) {
        const size_t n = utf8_valid_len(s, i, nullptr);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

std::string utf8_sanitize(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        size_t       bad = 0;
        const size_t n   = utf8_valid_len(s, i, &bad);
        if (n == 0) {
            out += utf8_replacement;
            i += bad;
        } else {
            out.append(s.data() + i, n);
            i += n;
        }
    }
    return out;
}

size_t utf8_incomplete_tail(std::string_view s) {
    // Look back at most 3 bytes for a lead byte whose sequence runs past the end.
    for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
        const auto b = static_cast<uint8_t>(s[s.size() - back]);
        if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking
        if (b < 0x80) return 0;
        size_t bad = 0;
        if (utf8_valid_len(s, s.size() - back, &bad) == 0 && bad == back) return back;
        return 0;
    }
    return 0;
}

byte_level_map::byte_level_map() {
    cp_to_byte.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
        const bool     printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        const uint32_t cp        = printable ? static_cast<uint32_t>(b) : 256u + static_cast<uint32_t>(n++);
        utf8_append(byte_to_str[b], cp);
        cp_to_byte[cp] = static_cast<int16_t>(b);
    }
}

const byte_level_map& byte_level_map::get() {
    static const byte_level_map map;
    return map;
}

}  // namespace gptq
