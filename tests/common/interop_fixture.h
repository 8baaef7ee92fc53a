// The interop fixtures of tests/data/interop (made by scripts/interop/make_fixtures.py): each is
// stored without the bytes it shares with models/tiny-llama or other fixtures, and is put back
// together from its fixture.json ("copy", "stored" and "splice"), checked against the size and
// FNV-1a 64 hash of the file the peer wrote. Header-only, for tests (test_interop_fixtures,
// test_lora).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

namespace gptq::test {

inline const char* const k_fixture_root = "tests/data/interop";

inline uint64_t fnv1a64(const std::string& bytes) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (unsigned char c : bytes) {
        h ^= c;
        h *= 0x100000001B3ull;
    }
    return h;
}

inline std::string hex64(uint64_t v) {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
    return buf;
}

inline nlohmann::json fixture_json(const std::string& name) {
    return nlohmann::json::parse(read_file(source_path(std::string(k_fixture_root) + "/" + name + "/fixture.json")));
}

// One file of a fixture as the peer wrote it (a bad splice list is reported through gtest).
inline std::string assemble_file(const std::string& fname, const nlohmann::json& e) {
    if (e.contains("copy")) return read_file(source_path(e["copy"].get<std::string>()));
    std::string part = read_file(source_path(e["stored"].get<std::string>()));
    if (!e.contains("splice")) return part;
    std::string out;
    size_t      taken = 0;  // bytes of `part` used so far
    for (const auto& s : e["splice"]) {
        const auto at  = s["at"].get<size_t>();
        const auto len = s["length"].get<size_t>();
        const auto off = s["offset"].get<size_t>();
        EXPECT_GE(at, out.size()) << fname << ": splice ranges out of order";
        const size_t gap = at - out.size();
        out.append(part, taken, gap);
        taken += gap;
        const std::string src = read_file(source_path(s["from"].get<std::string>()));
        EXPECT_LE(off + len, src.size()) << fname << ": splice source too short";
        out.append(src, off, len);
    }
    out.append(part, taken, std::string::npos);
    return out;
}

// Writes every file of the fixture into dir; false (with gtest failures) if one does not match.
inline bool assemble(const nlohmann::json& fx, const std::string& dir) {
    bool ok = true;
    for (const auto& [fname, e] : fx["files"].items()) {
        const std::string bytes = assemble_file(fname, e);
        const bool        same  = bytes.size() == e["size"].get<size_t>() && hex64(fnv1a64(bytes)) == e["fnv1a64"];
        EXPECT_TRUE(same) << fx["name"] << "/" << fname << ": " << bytes.size() << " bytes, fnv1a64 "
                          << hex64(fnv1a64(bytes)) << "; the peer wrote " << e["size"] << " bytes, " << e["fnv1a64"];
        ok = ok && same;
        write_file(dir + "/" + fname, bytes);
    }
    return ok;
}

}  // namespace gptq::test
