// io/gptq_checkpoint: a quantized module written through safetensors_writer reads back with the
// same codes, zeros, scales, g_idx and bias, for every bit width and both zero formats; shape
// and g_idx errors are caught; mislabelled v2 zeros are read right once resolved.
#include <gtest/gtest.h>

#include <random>

#include "core/dtype.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_pack.h"
#include "io/gptq_zero_format.h"
#include "test_util.h"

using namespace gptq;

namespace {

gptq_linear_data random_module(int64_t n_out, int64_t n_in, int64_t gs, int bits, bool bias, bool act_order, bool v1,
                               std::mt19937& rng) {
    gptq_linear_data d;
    d.n_out        = n_out;
    d.n_in         = n_in;
    d.bits         = bits;
    d.n_groups     = (n_in + gs - 1) / gs;
    const int maxq = (1 << bits) - 1;
    d.codes.resize(static_cast<size_t>(n_out * n_in));
    for (auto& c : d.codes) c = static_cast<uint8_t>(rng() % (maxq + 1));
    d.zeros.resize(static_cast<size_t>(d.n_groups * n_out));
    for (auto& z : d.zeros) z = static_cast<int32_t>(v1 ? 1 + rng() % maxq : rng() % (maxq + 1));
    d.scales.resize(d.zeros.size());
    for (auto& s : d.scales) s = f32_to_f16(0.001f + static_cast<float>(rng() % 1000) * 1e-4f);
    d.g_idx.resize(static_cast<size_t>(n_in));
    for (int64_t k = 0; k < n_in; ++k) d.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    if (act_order) std::shuffle(d.g_idx.begin(), d.g_idx.end(), rng);
    if (bias) {
        d.bias.resize(static_cast<size_t>(n_out));
        for (auto& b : d.bias) b = f32_to_f16(static_cast<float>(static_cast<int>(rng() % 200) - 100) * 0.01f);
    }
    return d;
}

}  // namespace

TEST(gptq_checkpoint, write_read_round_trip) {
    test::temp_dir dir("gptq-ckpt");
    std::mt19937   rng(5);
    int            i = 0;
    for (int bits : {2, 3, 4, 8})
        for (bool v1 : {true, false})
            for (bool act : {false, true}) {
                const int64_t n_out = 64, n_in = 96, gs = 32;
                auto          d = random_module(n_out, n_in, gs, bits, act, act, v1, rng);
                const auto fmt  = v1 ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2;
                const std::string path = dir.file("m" + std::to_string(i++) + ".safetensors");
                {
                    auto w = safetensors_writer::create(
                        path, gptq_linear_decls("blk.proj", n_out, n_in, d.n_groups, bits, !d.bias.empty()));
                    ASSERT_TRUE(w.is_ok());
                    ASSERT_TRUE(gptq_linear_write(**w, "blk.proj", d, fmt).is_ok());
                    ASSERT_TRUE((*w)->finish().is_ok());
                }
                auto src = tensor_source::open(path);
                ASSERT_TRUE(src.is_ok());
                gptq_config cfg;
                cfg.bits   = bits;
                cfg.format = fmt;
                cfg.sym    = false;
                auto back  = gptq_linear_read(**src, "blk.proj", n_out, n_in, cfg);
                ASSERT_TRUE(back.is_ok()) << back.error().message();
                EXPECT_EQ(back->codes, d.codes) << bits;
                EXPECT_EQ(back->zeros, d.zeros) << bits << v1;
                EXPECT_EQ(back->scales, d.scales);
                EXPECT_EQ(back->g_idx, d.g_idx);
                EXPECT_EQ(back->bias, d.bias);
                // keep_packed: the file's words, which unpack to the same codes; the rest as above.
                auto packed = gptq_linear_read(**src, "blk.proj", n_out, n_in, cfg, /*keep_packed=*/true);
                ASSERT_TRUE(packed.is_ok()) << packed.error().message();
                EXPECT_TRUE(packed->codes.empty());
                ASSERT_EQ(packed->qweight.size(), size_t(gptq_packed_words(n_in, bits) * n_out));
                std::vector<uint8_t> unpacked(size_t(n_out * n_in));
                gptq_unpack_qweight(packed->qweight.data(), n_out, n_in, bits, unpacked.data());
                EXPECT_EQ(unpacked, d.codes) << bits;
                EXPECT_EQ(packed->zeros, d.zeros);
                EXPECT_EQ(packed->scales, d.scales);
                // Dequantization follows format.md 1.5.
                std::vector<float> w(static_cast<size_t>(n_out * n_in));
                back->dequantize(w.data());
                const int64_t n = 17, k = 45;
                const auto    g = static_cast<size_t>(d.g_idx[k] * n_out + n);
                EXPECT_EQ(w[static_cast<size_t>(n * n_in + k)],
                          f16_to_f32(d.scales[g]) *
                              static_cast<float>(d.codes[static_cast<size_t>(n * n_in + k)] - d.zeros[g]));
            }
}

TEST(gptq_checkpoint, bad_tensors_are_named) {
    test::temp_dir dir("gptq-bad");
    std::mt19937   rng(6);
    auto           d       = random_module(32, 64, 32, 4, false, false, true, rng);
    d.g_idx[7]             = 9;  // only 2 groups
    const std::string path = dir.file("m.safetensors");
    {
        auto w = safetensors_writer::create(path, gptq_linear_decls("p", 32, 64, 2, 4, false));
        ASSERT_TRUE(gptq_linear_write(**w, "p", d, gptq_checkpoint_format::GPTQ_FORMAT_V1).is_ok());
        ASSERT_TRUE((*w)->finish().is_ok());
    }
    auto        src = tensor_source::open(path);
    gptq_config cfg;
    auto        r = gptq_linear_read(**src, "p", 32, 64, cfg);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("p.g_idx[7] = 9 is outside the 2 groups"), std::string::npos)
        << r.error().message();
    auto wrong = gptq_linear_read(**src, "p", 64, 64, cfg);  // expected shape differs
    ASSERT_FALSE(wrong.is_ok());
    EXPECT_NE(wrong.error().message().find("expected [n_groups, 64]"), std::string::npos) << wrong.error().message();
    auto missing = gptq_linear_read(**src, "q", 32, 64, cfg);
    ASSERT_FALSE(missing.is_ok());
    EXPECT_NE(missing.error().message().find("'q.g_idx'"), std::string::npos) << missing.error().message();
    cfg.bits = 3;  // 32 * 3 is fine for N but qweight rows differ
    EXPECT_FALSE(gptq_linear_read(**src, "p", 32, 64, cfg).is_ok());
}

TEST(gptq_checkpoint, mislabelled_v2_zeros_are_read_as_v2) {
    test::temp_dir dir("gptq-sniff");
    std::mt19937   rng(8);
    auto           d = random_module(32, 64, 32, 4, false, false, false, rng);
    for (auto& z : d.zeros) z = 8;  // symmetric 4-bit zero point
    const std::string path = dir.file("m.safetensors");
    {
        auto w = safetensors_writer::create(path, gptq_linear_decls("p", 32, 64, 2, 4, false));
        // Stored as v2 (fields = 8) while the config will claim v1.
        ASSERT_TRUE(gptq_linear_write(**w, "p", d, gptq_checkpoint_format::GPTQ_FORMAT_V2).is_ok());
        ASSERT_TRUE((*w)->finish().is_ok());
    }
    auto        src = tensor_source::open(path);
    gptq_config cfg;  // v1, sym
    // Read as labelled, the zeros are off by one; resolved from the data (one decision per
    // checkpoint, io/gptq_zero_format.h), they are right.
    auto naive = gptq_linear_read(**src, "p", 32, 64, cfg);
    ASSERT_TRUE(naive.is_ok());
    EXPECT_EQ(naive->zeros[0], 9);
    ASSERT_TRUE(gptq_zero_format_resolve(**src, &cfg).is_ok());
    EXPECT_EQ(cfg.format, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    auto r = gptq_linear_read(**src, "p", 32, 64, cfg);
    ASSERT_TRUE(r.is_ok());
    for (int32_t z : r->zeros) ASSERT_EQ(z, 8) << "a naive v1 read would give 9";
}
