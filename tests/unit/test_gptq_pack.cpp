// io/gptq_pack: qweight / qzeros bit packing against words computed by hand from format.md 1.3-1.4,
// and pack -> unpack round trips for every bit width and both zero-point formats.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "io/gptq_pack.h"

using namespace gptq;

TEST(gptq_pack, four_bit_word_holds_eight_codes_low_nibble_first) {
    // One output column, K = 16: codes 0..15 -> word 0 = codes 0..7 at shifts 0,4,..,28.
    std::vector<uint8_t> codes(16);
    for (int k = 0; k < 16; ++k) codes[static_cast<size_t>(k)] = static_cast<uint8_t>(k);
    std::vector<int32_t> qw(2);
    gptq_pack_qweight(codes.data(), 1, 16, 4, qw.data());
    EXPECT_EQ(static_cast<uint32_t>(qw[0]), 0x76543210u);
    EXPECT_EQ(static_cast<uint32_t>(qw[1]), 0xFEDCBA98u);
    // Two output columns interleave as [K*b/32, N]: word r of column n at qweight[r * N + n].
    std::vector<uint8_t> two(32);
    for (int k = 0; k < 16; ++k) {
        two[static_cast<size_t>(k)]      = static_cast<uint8_t>(k);
        two[static_cast<size_t>(16 + k)] = static_cast<uint8_t>(15 - k);
    }
    std::vector<int32_t> qw2(4);
    gptq_pack_qweight(two.data(), 2, 16, 4, qw2.data());
    EXPECT_EQ(static_cast<uint32_t>(qw2[0]), 0x76543210u);
    EXPECT_EQ(static_cast<uint32_t>(qw2[1]), 0x89ABCDEFu);
    EXPECT_EQ(static_cast<uint32_t>(qw2[2]), 0xFEDCBA98u);
    EXPECT_EQ(static_cast<uint32_t>(qw2[3]), 0x01234567u);
}

TEST(gptq_pack, two_and_eight_bit_words) {
    std::vector<uint8_t> c2(16);
    for (int k = 0; k < 16; ++k) c2[static_cast<size_t>(k)] = static_cast<uint8_t>(k % 4);
    int32_t w2 = 0;
    gptq_pack_qweight(c2.data(), 1, 16, 2, &w2);
    EXPECT_EQ(static_cast<uint32_t>(w2), 0xE4E4E4E4u);  // 3,2,1,0 per byte from the top
    std::vector<uint8_t> c8 = {0x11, 0x22, 0x33, 0xF4};
    int32_t              w8 = 0;
    gptq_pack_qweight(c8.data(), 1, 4, 8, &w8);
    EXPECT_EQ(static_cast<uint32_t>(w8), 0xF4332211u);
}

TEST(gptq_pack, three_bit_codes_straddle_words_10_and_21) {
    // Code 10 = 0b101: low two bits (01) in bits 30-31 of word 0, bit 2 (1) in bit 0 of word 1.
    // Code 21 = 0b110: low bit (0) in bit 31 of word 1, bits 1-2 (11) in bits 0-1 of word 2.
    std::vector<uint8_t> codes(32, 0);
    codes[10] = 5;
    codes[21] = 6;
    codes[11] = 7;  // word 1 at shift 1
    codes[22] = 1;  // word 2 at shift 2
    codes[0]  = 3;
    std::vector<int32_t> qw(3);
    gptq_pack_qweight(codes.data(), 1, 32, 3, qw.data());
    EXPECT_EQ(static_cast<uint32_t>(qw[0]), (1u << 30) | 3u);
    EXPECT_EQ(static_cast<uint32_t>(qw[1]), 1u | (7u << 1));
    EXPECT_EQ(static_cast<uint32_t>(qw[2]), 3u | (1u << 2));
}

TEST(gptq_pack, symmetric_v1_zero_words_match_the_spec) {
    // sym zero = 2^(b-1), stored minus one in v1 (format.md 1.4).
    struct c {
        int                   bits;
        std::vector<uint32_t> words;
    };
    for (const auto& t : std::vector<c>{{2, {0x55555555u}},
                                        {4, {0x77777777u}},
                                        {8, {0x7F7F7F7Fu}},
                                        {3, {0xDB6DB6DBu, 0xB6DB6DB6u, 0x6DB6DB6Du}}}) {
        const int64_t        n = 32 * static_cast<int64_t>(t.words.size()) / t.bits;
        std::vector<int32_t> zeros(static_cast<size_t>(n), 1 << (t.bits - 1));
        std::vector<int32_t> qz(t.words.size());
        ASSERT_TRUE(
            gptq_pack_qzeros(zeros.data(), 1, n, t.bits, gptq_checkpoint_format::GPTQ_FORMAT_V1, qz.data()).is_ok());
        for (size_t i = 0; i < t.words.size(); ++i) EXPECT_EQ(static_cast<uint32_t>(qz[i]), t.words[i]) << t.bits;
        // v2 stores the zero itself: 4-bit 0x88888888.
        if (t.bits == 4) {
            ASSERT_TRUE(
                gptq_pack_qzeros(zeros.data(), 1, n, 4, gptq_checkpoint_format::GPTQ_FORMAT_V2, qz.data()).is_ok());
            EXPECT_EQ(static_cast<uint32_t>(qz[0]), 0x88888888u);
        }
    }
}

TEST(gptq_pack, v1_cannot_store_zero_point_zero) {
    std::vector<int32_t> zeros(8, 3);
    zeros[5]   = 0;
    int32_t qz = 0;
    auto    st = gptq_pack_qzeros(zeros.data(), 1, 8, 4, gptq_checkpoint_format::GPTQ_FORMAT_V1, &qz);
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("zero point 0 of group 0 column 5"), std::string::npos) << st.message();
    EXPECT_TRUE(gptq_pack_qzeros(zeros.data(), 1, 8, 4, gptq_checkpoint_format::GPTQ_FORMAT_V2, &qz).is_ok());
}

TEST(gptq_pack, round_trips_every_width_and_format) {
    std::mt19937 rng(7);
    for (int bits : {2, 3, 4, 8}) {
        const int maxq = (1 << bits) - 1;
        for (int64_t n_in : {32, 64, 96, 320}) {
            for (int64_t n_out : {32, 64, 160}) {
                std::vector<uint8_t> codes(static_cast<size_t>(n_in * n_out));
                for (auto& c : codes) c = static_cast<uint8_t>(rng() % (maxq + 1));
                std::vector<int32_t> qw(static_cast<size_t>(gptq_packed_words(n_in, bits) * n_out));
                gptq_pack_qweight(codes.data(), n_out, n_in, bits, qw.data());
                std::vector<uint8_t> back(codes.size());
                gptq_unpack_qweight(qw.data(), n_out, n_in, bits, back.data());
                ASSERT_EQ(back, codes) << bits << " " << n_in << " " << n_out;

                const int64_t n_groups = 3;
                for (auto fmt : {gptq_checkpoint_format::GPTQ_FORMAT_V1, gptq_checkpoint_format::GPTQ_FORMAT_V2}) {
                    const bool           v1 = fmt == gptq_checkpoint_format::GPTQ_FORMAT_V1;
                    std::vector<int32_t> zeros(static_cast<size_t>(n_groups * n_out));
                    for (auto& z : zeros) z = static_cast<int32_t>(v1 ? 1 + rng() % maxq : rng() % (maxq + 1));
                    std::vector<int32_t> qz(static_cast<size_t>(n_groups * gptq_packed_words(n_out, bits)));
                    ASSERT_TRUE(gptq_pack_qzeros(zeros.data(), n_groups, n_out, bits, fmt, qz.data()).is_ok());
                    std::vector<int32_t> zback(zeros.size());
                    gptq_unpack_qzeros(qz.data(), n_groups, n_out, bits, fmt, zback.data());
                    ASSERT_EQ(zback, zeros) << bits;
                }
            }
        }
    }
}

TEST(gptq_pack, packability_is_checked) {
    EXPECT_TRUE(gptq_check_packable(4096, 11008, 4, "m").is_ok());
    EXPECT_TRUE(gptq_check_packable(4096, 11008, 3, "m").is_ok());
    auto st = gptq_check_packable(100, 64, 4, "model.layers.0.mlp.up_proj");
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("model.layers.0.mlp.up_proj: in_features 100"), std::string::npos) << st.message();
    EXPECT_FALSE(gptq_check_packable(64, 48, 3, "m").is_ok());
}
