#include "tokenizer/unicode_nfc.h"

#include <algorithm>
#include <tuple>
#include <vector>

#include "tokenizer/utf8.h"

namespace gptq {

namespace {

// Hangul syllable arithmetic (Unicode chapter 3.12).
constexpr uint32_t hangul_s = 0xAC00, hangul_l = 0x1100, hangul_v = 0x1161, hangul_t = 0x11A7;
constexpr uint32_t n_l = 19, n_v = 21, n_t = 28, n_s = n_l * n_v * n_t;

uint8_t ccc_of(uint32_t cp) {
    using namespace nfc_data;
    const ccc_run* end = ccc_runs + n_ccc_runs;
    const ccc_run* it  = std::upper_bound(ccc_runs, end, cp, [](uint32_t c, const ccc_run& r) { return c < r.first; });
    if (it == ccc_runs) return 0;
    --it;
    return cp <= it->last ? it->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
    using namespace nfc_data;
    if (cp >= hangul_s && cp < hangul_s + n_s) {
        const uint32_t s = cp - hangul_s;
        out.push_back(hangul_l + s / (n_v * n_t));
        out.push_back(hangul_v + (s % (n_v * n_t)) / n_t);
        if (s % n_t) out.push_back(hangul_t + s % n_t);
        return;
    }
    const decomp_entry* end = decomp_entries + n_decomp_entries;
    const decomp_entry* it =
        std::lower_bound(decomp_entries, end, cp, [](const decomp_entry& e, uint32_t c) { return e.cp < c; });
    if (it != end && it->cp == cp) {
        out.insert(out.end(), decomp_pool + it->offset, decomp_pool + it->offset + it->count);
        return;
    }
    out.push_back(cp);
}

// The primary composite of (a, b), or 0.
uint32_t compose(uint32_t a, uint32_t b) {
    using namespace nfc_data;
    if (a >= hangul_l && a < hangul_l + n_l && b >= hangul_v && b < hangul_v + n_v)
        return hangul_s + ((a - hangul_l) * n_v + (b - hangul_v)) * n_t;
    if (a >= hangul_s && a < hangul_s + n_s && (a - hangul_s) % n_t == 0 && b > hangul_t && b < hangul_t + n_t)
        return a + (b - hangul_t);
    const comp_entry* end = comp_entries + n_comp_entries;
    const comp_entry* it  = std::lower_bound(comp_entries, end, std::make_pair(a, b), [](const comp_entry& e, auto k) {
        return e.first != k.first ? e.first < k.first : e.second < k.second;
    });
    return it != end && it->first == a && it->second == b ? it->composite : 0;
}

}  // namespace

std::string unicode_nfc(std::string_view text) {
    // Quick check: text below U+0300 is already NFC (no combining marks, no decomposables... except
    // Latin-1 letters, which are composed already and compose with nothing that follows below U+0300).
    bool simple = true;
    for (char c : text) {
        const auto b = static_cast<uint8_t>(c);
        if (b >= 0xCC) {  // lead bytes of U+0300 and above
            simple = false;
            break;
        }
    }
    if (simple) return std::string(text);

    std::vector<uint32_t> cps;
    cps.reserve(text.size());
    for (size_t i = 0; i < text.size();) decompose(utf8_next(text, i), cps);

    // Canonical ordering: stable sort of each run of non-starters by combining class.
    std::vector<uint8_t> cls(cps.size());
    for (size_t k = 0; k < cps.size(); ++k) cls[k] = ccc_of(cps[k]);
    for (size_t k = 0; k < cps.size();) {
        if (cls[k] == 0) {
            ++k;
            continue;
        }
        size_t e = k;
        while (e < cps.size() && cls[e] != 0) ++e;
        std::vector<std::pair<uint8_t, uint32_t>> run;
        for (size_t q = k; q < e; ++q) run.emplace_back(cls[q], cps[q]);
        std::stable_sort(run.begin(), run.end(), [](auto& x, auto& y) { return x.first < y.first; });
        for (size_t q = k; q < e; ++q) std::tie(cls[q], cps[q]) = run[q - k];
        k = e;
    }

    // Canonical composition: each character combines with the last starter unless blocked (an
    // intervening character with class 0 or with a class >= its own).
    std::vector<uint32_t> out;
    std::vector<uint8_t>  out_cls;
    out.reserve(cps.size());
    long starter = -1;
    for (size_t k = 0; k < cps.size(); ++k) {
        const uint32_t cp = cps[k];
        const uint8_t  c  = cls[k];
        if (starter >= 0) {
            const uint8_t last_cls = out.size() > static_cast<size_t>(starter) + 1 ? out_cls.back() : 0;
            const bool    adjacent = out.size() == static_cast<size_t>(starter) + 1;
            if (adjacent || (last_cls != 0 && last_cls < c)) {
                const uint32_t composite = compose(out[starter], cp);
                if (composite) {
                    out[starter] = composite;
                    continue;
                }
            }
        }
        out.push_back(cp);
        out_cls.push_back(c);
        if (c == 0) starter = static_cast<long>(out.size()) - 1;
    }
    std::string s;
    s.reserve(text.size());
    for (uint32_t cp : out) utf8_append(s, cp);
    return s;
}

}  // namespace gptq
