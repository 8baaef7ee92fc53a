// io/gptq_zero_format: the zero-point format (v1 "gptq" / v2 "gptq_v2", format.md 1.4) decided
// from the data of synthetic checkpoints made like a min-max quantizer makes them, for every bit
// width, symmetric and asymmetric, stored either way and labelled either way; ambiguous data
// follows the label; a mislabel is a warning printed once per checkpoint.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/dtype.h"
#include "core/log.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_pack.h"
#include "io/gptq_zero_format.h"
#include "test_util.h"

using namespace gptq;
using F = gptq_checkpoint_format;

namespace {

// Round-to-nearest quantization of N(0, 1) weights as GPTQ's quantizer does it (format.md 2.3):
// sym: zero 2^(b-1), scale 2 max|w| / maxq; asym: scale (max - min) / maxq, zero round(-min / scale)
// clamped to [zero_min, maxq]. act_order shuffles g_idx.
gptq_linear_data quantize_like_gptq(int64_t n_out, int64_t n_in, int64_t gs, int bits, bool sym, int zero_min,
                                    bool act_order, std::mt19937& rng) {
    gptq_linear_data d;
    d.n_out = n_out, d.n_in = n_in, d.bits = bits, d.n_groups = n_in / gs;
    const int                       maxq = (1 << bits) - 1;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    d.g_idx.resize(static_cast<size_t>(n_in));
    for (int64_t k = 0; k < n_in; ++k) d.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    if (act_order) std::shuffle(d.g_idx.begin(), d.g_idx.end(), rng);
    d.codes.resize(static_cast<size_t>(n_out * n_in));
    d.zeros.resize(static_cast<size_t>(d.n_groups * n_out));
    d.scales.resize(d.zeros.size());
    std::vector<float> w(static_cast<size_t>(n_in));
    for (int64_t n = 0; n < n_out; ++n) {
        for (auto& x : w) x = normal(rng);
        for (int64_t g = 0; g < d.n_groups; ++g) {
            float lo = 0.0f, hi = 0.0f;
            for (int64_t k = 0; k < n_in; ++k)
                if (d.g_idx[static_cast<size_t>(k)] == g) {
                    lo = std::min(lo, w[static_cast<size_t>(k)]);
                    hi = std::max(hi, w[static_cast<size_t>(k)]);
                }
            if (sym) hi = std::max(-lo, hi), lo = -hi;
            const float s = (hi - lo) / static_cast<float>(maxq);
            const int z = sym ? (maxq + 1) / 2 : std::clamp(static_cast<int>(std::nearbyint(-lo / s)), zero_min, maxq);
            d.scales[static_cast<size_t>(g * n_out + n)] = f32_to_f16(s);
            d.zeros[static_cast<size_t>(g * n_out + n)]  = z;
            for (int64_t k = 0; k < n_in; ++k)
                if (d.g_idx[static_cast<size_t>(k)] == g)
                    d.codes[static_cast<size_t>(n * n_in + k)] = static_cast<uint8_t>(
                        std::clamp(static_cast<int>(std::nearbyint(w[static_cast<size_t>(k)] / s)) + z, 0, maxq));
        }
    }
    return d;
}

// Write modules "blk.<i>.proj" (already unpacked) to one file; `fmt` packs the zeros.
std::string write_modules(const test::temp_dir& dir, const std::string& name, const std::vector<gptq_linear_data>& ms,
                          F fmt) {
    const std::string             path = dir.file(name);
    std::vector<safetensors_decl> decls;
    for (size_t i = 0; i < ms.size(); ++i) {
        auto d = gptq_linear_decls("blk." + std::to_string(i) + ".proj", ms[i].n_out, ms[i].n_in, ms[i].n_groups,
                                   ms[i].bits, false);
        decls.insert(decls.end(), d.begin(), d.end());
    }
    auto w = safetensors_writer::create(path, decls);
    EXPECT_TRUE(w.is_ok());
    for (size_t i = 0; i < ms.size(); ++i)
        EXPECT_TRUE(gptq_linear_write(**w, "blk." + std::to_string(i) + ".proj", ms[i], fmt).is_ok());
    EXPECT_TRUE((*w)->finish().is_ok());
    return path;
}

gptq_config config_labelled(F label, bool sym, int bits) {
    gptq_config c;
    c.source = "test quantize_config.json";
    c.format = label;
    c.sym    = sym;
    c.bits   = bits;
    return c;
}

}  // namespace

TEST(gptq_zero_format, data_decides_for_every_width_both_grids_and_both_labels) {
    test::temp_dir dir("zf-matrix");
    std::mt19937   rng(11);
    int            i = 0;
    for (int bits : {2, 3, 4, 8})
        for (bool sym : {true, false})
            for (F stored : {F::GPTQ_FORMAT_V1, F::GPTQ_FORMAT_V2}) {
                // v1 cannot hold an asymmetric zero of 0: the quantizer keeps zeros >= 1 for it.
                const int                     zero_min = stored == F::GPTQ_FORMAT_V1 ? 1 : 0;
                std::vector<gptq_linear_data> ms;
                for (int m = 0; m < 8; ++m)
                    ms.push_back(quantize_like_gptq(128, 512, 128, bits, sym, zero_min, /*act_order=*/m == 1, rng));
                auto src =
                    tensor_source::open(write_modules(dir, "m" + std::to_string(i++) + ".safetensors", ms, stored));
                ASSERT_TRUE(src.is_ok());
                for (F label : {F::GPTQ_FORMAT_V1, F::GPTQ_FORMAT_V2}) {
                    const auto what = ::testing::Message() << bits << "-bit " << (sym ? "sym" : "asym") << " stored "
                                                           << gptq_checkpoint_format_name(stored) << " labelled "
                                                           << gptq_checkpoint_format_name(label);
                    auto ev = gptq_zero_format_detect(**src, config_labelled(label, sym, bits));
                    ASSERT_TRUE(ev.is_ok()) << ev.error().message();
                    EXPECT_TRUE(ev->decided) << what << ": " << ev->basis;
                    EXPECT_EQ(ev->format, stored) << what << ": " << ev->basis;
                    EXPECT_EQ(ev->mismatch, label != stored) << what;
                    EXPECT_EQ(ev->n_modules, 8) << what;
                    if (!sym) {  // the statistic sits near 1 (v1) or 0 (v2), within its own noise
                        EXPECT_NEAR(ev->mean_offset, stored == F::GPTQ_FORMAT_V1 ? 1.0 : 0.0, 0.05 + 4 * ev->offset_se)
                            << what;
                        EXPECT_LE(ev->offset_se, k_zero_max_se) << what;
                    }
                    // Loading after resolve gives the zeros that were quantized, whatever the label.
                    gptq_config cfg = config_labelled(label, sym, bits);
                    ASSERT_TRUE(gptq_zero_format_resolve(**src, &cfg).is_ok());
                    auto back = gptq_linear_read(**src, "blk.1.proj", 128, 512, cfg);
                    ASSERT_TRUE(back.is_ok()) << back.error().message();
                    EXPECT_EQ(back->zeros, ms[1].zeros) << what;
                }
            }
}

TEST(gptq_zero_format, ambiguous_data_follows_the_label) {
    test::temp_dir dir("zf-ambiguous");
    std::mt19937   rng(12);
    // Too few (group, column) pairs: one 32 x 32 module, one group.
    auto small = quantize_like_gptq(32, 32, 32, 4, false, 1, false, rng);
    auto src   = tensor_source::open(write_modules(dir, "small.safetensors", {small}, F::GPTQ_FORMAT_V1));
    ASSERT_TRUE(src.is_ok());
    for (F label : {F::GPTQ_FORMAT_V1, F::GPTQ_FORMAT_V2}) {
        auto ev = gptq_zero_format_detect(**src, config_labelled(label, false, 4));
        ASSERT_TRUE(ev.is_ok());
        EXPECT_FALSE(ev->decided) << ev->basis;
        EXPECT_EQ(ev->format, label);
        EXPECT_FALSE(ev->mismatch);
        EXPECT_NE(ev->basis.find("too few"), std::string::npos) << ev->basis;
    }
    // Codes half at the stored field, half one above: mean code - field = 0.5 exactly.
    auto mid = quantize_like_gptq(64, 256, 64, 4, false, 1, false, rng);
    for (int64_t n = 0; n < 64; ++n)
        for (int64_t k = 0; k < 256; ++k) {
            const int32_t z                    = std::min(mid.zeros[size_t(k / 64 * 64 + n)], 14);
            mid.zeros[size_t(k / 64 * 64 + n)] = z;
            mid.codes[size_t(n * 256 + k)]     = static_cast<uint8_t>(z + (k % 2));
        }
    auto src2 = tensor_source::open(write_modules(dir, "mid.safetensors", {mid}, F::GPTQ_FORMAT_V2));
    ASSERT_TRUE(src2.is_ok());
    for (F label : {F::GPTQ_FORMAT_V1, F::GPTQ_FORMAT_V2}) {
        auto ev = gptq_zero_format_detect(**src2, config_labelled(label, false, 4));
        ASSERT_TRUE(ev.is_ok());
        EXPECT_NEAR(ev->mean_offset, 0.5, 1e-9);
        EXPECT_FALSE(ev->decided) << ev->basis;
        EXPECT_EQ(ev->format, label);
        EXPECT_NE(ev->basis.find("ambiguous"), std::string::npos) << ev->basis;
    }
    // 8 bits, few outputs: the mean's standard error is too large to decide.
    auto noisy = quantize_like_gptq(64, 256, 64, 8, false, 0, false, rng);
    auto src3  = tensor_source::open(write_modules(dir, "noisy.safetensors", {noisy}, F::GPTQ_FORMAT_V2));
    ASSERT_TRUE(src3.is_ok());
    auto ev3 = gptq_zero_format_detect(**src3, config_labelled(F::GPTQ_FORMAT_V1, false, 8));
    ASSERT_TRUE(ev3.is_ok());
    EXPECT_GT(ev3->offset_se, k_zero_max_se) << ev3->basis;
    EXPECT_FALSE(ev3->decided) << ev3->basis;
    EXPECT_EQ(ev3->format, F::GPTQ_FORMAT_V1);
    // A marlin checkpoint has no qzeros: the label stays.
    auto ev = gptq_zero_format_detect(**src2, config_labelled(F::GPTQ_FORMAT_MARLIN, true, 4));
    ASSERT_TRUE(ev.is_ok());
    EXPECT_FALSE(ev->decided);
    EXPECT_EQ(ev->format, F::GPTQ_FORMAT_MARLIN);
}

TEST(gptq_zero_format, v1_wrapped_zero_of_zero_is_counted_and_left_out) {
    test::temp_dir dir("zf-wrap");
    std::mt19937   rng(13);
    // An asymmetric v1 writer that stored zero 0 as -1: the field wraps to 2^b - 1 = 15. Build the
    // raw fields by hand (v2 packing stores them as given).
    auto d      = quantize_like_gptq(128, 256, 64, 4, false, 0, false, rng);
    int  n_zero = 0;
    for (int64_t g = 0; g < 4; ++g)  // some groups of non-negative weights: zero 0, codes sitting low
        for (int64_t n = 0; n < 8; ++n) {
            const size_t cell = size_t(g * 128 + n);
            for (int64_t k = g * 64; k < g * 64 + 64; ++k) d.codes[size_t(n * 256 + k)] = uint8_t(k % 10);
            d.zeros[cell] = 0;
            ++n_zero;
        }
    auto raw = d;
    for (auto& z : raw.zeros) z = (z - 1) & 15;
    auto src = tensor_source::open(write_modules(dir, "wrap.safetensors", {raw}, F::GPTQ_FORMAT_V2));
    ASSERT_TRUE(src.is_ok());
    auto ev = gptq_zero_format_detect(**src, config_labelled(F::GPTQ_FORMAT_V2, false, 4));
    ASSERT_TRUE(ev.is_ok());
    EXPECT_EQ(ev->format, F::GPTQ_FORMAT_V1) << ev->basis;
    EXPECT_TRUE(ev->mismatch);
    EXPECT_GE(ev->n_top, n_zero);
    EXPECT_EQ(ev->n_wrap, n_zero);  // their codes average 4.5, under 15 / 2
}

TEST(gptq_zero_format, mismatch_warns_once_per_checkpoint) {
    test::temp_dir dir("zf-warn");
    std::mt19937   rng(14);
    auto           d   = quantize_like_gptq(64, 256, 64, 4, true, 0, false, rng);
    auto           src = tensor_source::open(write_modules(dir, "sym.safetensors", {d}, F::GPTQ_FORMAT_V1));
    ASSERT_TRUE(src.is_ok());
    log_set_level(log_level::LOG_INFO);
    ::testing::internal::CaptureStderr();
    for (int i = 0; i < 3; ++i) {
        gptq_config cfg = config_labelled(F::GPTQ_FORMAT_V2, true, 4);
        auto        ev  = gptq_zero_format_resolve(**src, &cfg);
        ASSERT_TRUE(ev.is_ok());
        EXPECT_EQ(cfg.format, F::GPTQ_FORMAT_V1);
    }
    const std::string err = ::testing::internal::GetCapturedStderr();
    size_t            n   = 0;
    for (size_t p = err.find("checkpoint_format says"); p != std::string::npos;
         p        = err.find("checkpoint_format says", p + 1))
        ++n;
    EXPECT_EQ(n, 1u) << err;
    // The warning names the config file, the label and what the data says.
    EXPECT_NE(err.find("test quantize_config.json: checkpoint_format says 'gptq_v2' but the zero points are 'gptq'"),
              std::string::npos)
        << err;
}
