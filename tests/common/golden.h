// Golden fixtures computed by transformers (scripts/device/make_logit_goldens.py for the real and
// rand-* models, scripts/make_arch_goldens.py for tests/data/arch/): the layout of
// golden.safetensors is documented in scripts/make_arch_goldens.py. Header-only, for tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace gptq::test {

struct golden_seq {
    std::vector<int32_t> ids;
    std::vector<int32_t> positions;
    std::vector<float>   logits;  // [positions, n_vocab]
    std::vector<float>   hidden;  // [ids, n_embd] after layer 0, or empty
    std::vector<int32_t> greedy;  // greedy continuation of ids, or empty
};

struct golden_file {
    std::vector<golden_seq> seqs;
    std::vector<int32_t>    ppl_ids;    // empty when the file has no ppl
    double                  ppl = 0.0;  // exp(mean NLL of ppl_ids[1:])
};

inline std::vector<int32_t> golden_read_i32(const safetensors_file& f, const std::string& name) {
    std::vector<int32_t> v;
    if (const auto* t = f.find(name)) {
        v.resize(static_cast<size_t>(t->numel()));
        f.copy_to(*t, v.data());
    }
    return v;
}

inline std::vector<float> golden_read_f32(const safetensors_file& f, const std::string& name) {
    std::vector<float> v;
    if (const auto* t = f.find(name)) {
        v.resize(static_cast<size_t>(t->numel()));
        EXPECT_TRUE(f.read_f32(*t, v.data()).is_ok()) << name;
    }
    return v;
}

inline golden_file golden_load_file(const std::string& path) {
    golden_file out;
    auto        f = safetensors_file::open(path);
    EXPECT_TRUE(f.is_ok()) << f.error().message();
    if (!f.is_ok()) return out;
    for (int k = 0;; ++k) {
        const std::string p = "seq" + std::to_string(k) + ".";
        if (!(*f)->find(p + "ids")) break;
        golden_seq s;
        s.ids       = golden_read_i32(**f, p + "ids");
        s.positions = golden_read_i32(**f, p + "positions");
        s.logits    = golden_read_f32(**f, p + "logits");
        s.hidden    = golden_read_f32(**f, p + "hidden_after_layer0");
        s.greedy    = golden_read_i32(**f, p + "greedy");
        out.seqs.push_back(std::move(s));
    }
    out.ppl_ids  = golden_read_i32(**f, "ppl.ids");
    const auto v = golden_read_f32(**f, "ppl.value");
    if (!v.empty()) out.ppl = v[0];
    return out;
}

// max |a - b| / max |b| over one row.
inline double row_rel_error(const float* a, const float* b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
        num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
        den = std::max(den, std::fabs(static_cast<double>(b[i])));
    }
    return num / std::max(den, 1e-30);
}

}  // namespace gptq::test
