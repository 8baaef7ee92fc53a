// The int8-activation GPTQ GEMV of kernels/cpu/gptq_linear.h (decode rows): every kernel the CPU
// has (scalar, AVX2 maddubs, AVX512-VNNI vpdpbusd on 256- and 512-bit registers) on fresh random layers of bits
// 2/3/4/8, group sizes 32/64/128/-1 and odd ones, with and without act-order, K not a multiple of 32.
//
// Two checks per output, each against a bound derived for it, never a tuned tolerance:
// 1. Against the double-precision reference on the SAME dequantized activations d_c * xq[k]: the
//    integer chunk dots are exact, so the only difference is F32 rounding in the kernel's sums.
//    With n_ops the length of the longest chain of F32 operations (chunks + groups + a few), the
//    error is below gamma(n_ops) * sum_k |s| (q + z) |d xq| (Higham's bound, with every partial sum
//    bounded by that sum of magnitudes, the zero-point term included).
// 2. Against the double reference on the ORIGINAL F32 activations: |x - d xq| <= d / 2 per element
//    (round to nearest), so |y - y_f32| <= sum_k |w[n, k]| d_c(k) / 2 plus bound 1.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/thread_pool.h"
#include "kernels/cpu/gptq_linear.h"
#include "ops/gptq_linear.h"

using namespace gptq;

namespace {

struct random_layer {
    int64_t              n_out, n_in, n_groups;
    std::vector<uint8_t> codes;  // [n_out, n_in]
    std::vector<float>   scales;
    std::vector<int32_t> zeros, g_idx;
    std::vector<float>   zeros_f;
};

random_layer make(int64_t n_out, int64_t n_in, int64_t gs, int bits, bool act_order, std::mt19937& rng) {
    if (gs < 0) gs = n_in;
    random_layer L{n_out, n_in, (n_in + gs - 1) / gs, {}, {}, {}, {}, {}};
    const int    maxq = (1 << bits) - 1;
    L.codes.resize(static_cast<size_t>(n_out * n_in));
    for (auto& c : L.codes) c = static_cast<uint8_t>(rng() % (maxq + 1));
    std::uniform_real_distribution<float> sd(0.001f, 0.05f);
    L.scales.resize(static_cast<size_t>(L.n_groups * n_out));
    for (auto& s : L.scales) s = sd(rng);
    L.zeros.resize(L.scales.size());
    for (auto& z : L.zeros) z = static_cast<int32_t>(rng() % (maxq + 2));  // v1 zeros reach maxq + 1
    L.zeros_f.assign(L.zeros.begin(), L.zeros.end());
    L.g_idx.resize(static_cast<size_t>(n_in));
    for (int64_t k = 0; k < n_in; ++k) L.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    if (act_order) std::shuffle(L.g_idx.begin(), L.g_idx.end(), rng);
    return L;
}

struct q8 {
    std::vector<int8_t> xq;
    std::vector<float>  d, xsum;
    cpu::gptq_q8_row    row() { return {xq.data(), d.data(), xsum.data()}; }
};

q8 quantize(const float* x, const cpu::gptq_cpu_layout& l) {
    q8 a{std::vector<int8_t>(static_cast<size_t>(l.k_pad)),
         std::vector<float>(static_cast<size_t>(l.k_pad / cpu::k_gptq_chunk)),
         std::vector<float>(static_cast<size_t>(l.n_groups))};
    cpu::gptq_quantize_activations(x, l, a.row());
    return a;
}

// The dequantized activations d_c xq[p] in the original input order, and each input's d_c.
void dequantized(const gptq_packed_linear& p, q8& a, std::vector<float>* xd, std::vector<float>* dk) {
    xd->assign(static_cast<size_t>(p.n_in), 0.0f);
    dk->assign(static_cast<size_t>(p.n_in), 0.0f);
    for (int64_t g = 0; g < p.n_groups; ++g)
        for (int64_t i = p.group_start[size_t(g)]; i < p.group_start[size_t(g + 1)]; ++i) {
            const int64_t pos = p.pad_start[size_t(g)] + (i - p.group_start[size_t(g)]);
            const int64_t k   = p.perm.empty() ? i : p.perm[size_t(i)];
            const float   d   = a.d[size_t(pos / cpu::k_gptq_chunk)];
            (*xd)[size_t(k)]  = d * static_cast<float>(a.xq[size_t(pos)]);
            (*dk)[size_t(k)]  = d;
        }
}

}  // namespace

TEST(cpu_int4_gemv, kernels_within_derived_bounds) {
    std::mt19937                    rng(2022);
    std::normal_distribution<float> nd;
    std::vector<cpu::gptq_isa>      isas;
    for (auto i : {cpu::gptq_isa::GPTQ_ISA_SCALAR, cpu::gptq_isa::GPTQ_ISA_AVX2, cpu::gptq_isa::GPTQ_ISA_VNNI,
                   cpu::gptq_isa::GPTQ_ISA_AVX512})
        if (cpu::gptq_isa_available(i)) isas.push_back(i);
    std::printf("kernels tested:");
    for (auto i : isas) std::printf(" %s", cpu::gptq_isa_name(i));
    std::printf("\n");
    const double eps   = std::ldexp(1.0, -24);
    int          cases = 0;
    for (int bits : {2, 3, 4, 8})
        for (auto [n_out, n_in, gs] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{8, 32, 32},
                                                                                         {24, 96, 32},
                                                                                         {64, 200, 64},
                                                                                         {100, 128, 128},
                                                                                         {37, 1000, 128},
                                                                                         {13, 257, -1},
                                                                                         {5, 33, 64},
                                                                                         {136, 96, 96},
                                                                                         {8, 40, 7}})
            for (bool act : {false, true}) {
                auto L = make(n_out, n_in, gs, bits, act, rng);
                auto p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                           L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                const cpu::gptq_cpu_layout l = p.layout();
                std::vector<float>         x(static_cast<size_t>(n_in));
                for (auto& v : x) v = nd(rng) * (rng() % 50 == 0 ? 20.0f : 1.0f);  // a few outliers
                q8                 a = quantize(x.data(), l);
                std::vector<float> xd, dk;
                dequantized(p, a, &xd, &dk);
                // Round to nearest: every activation within d / 2 of its dequantized value.
                for (int64_t k = 0; k < n_in; ++k)
                    ASSERT_LE(std::fabs(x[size_t(k)] - xd[size_t(k)]), 0.5 * dk[size_t(k)] * (1 + 4 * eps) + 1e-30);
                std::vector<float> ref8(static_cast<size_t>(n_out)), ref32(ref8.size());
                cpu::gptq_linear_ref(xd.data(), L.codes.data(), L.scales.data(), L.zeros_f.data(), L.g_idx.data(),
                                     nullptr, ref8.data(), 1, n_out, n_in);
                cpu::gptq_linear_ref(x.data(), L.codes.data(), L.scales.data(), L.zeros_f.data(), L.g_idx.data(),
                                     nullptr, ref32.data(), 1, n_out, n_in);
                const double n_ops = static_cast<double>(l.k_pad / cpu::k_gptq_chunk + l.n_groups + 8);
                const double gamma = n_ops * eps / (1 - n_ops * eps);
                for (auto isa : isas) {
                    std::vector<float> y(static_cast<size_t>(n_out));
                    cpu::gptq_gemv_q8(l, a.row(), y.data(), 0, n_out, isa);
                    for (int64_t n = 0; n < n_out; ++n) {
                        double mag = 0, act_err = 0;
                        for (int64_t k = 0; k < n_in; ++k) {
                            const auto  gi = static_cast<size_t>(L.g_idx[size_t(k)] * n_out + n);
                            const float q  = L.codes[size_t(n * n_in + k)];
                            mag += L.scales[gi] * (q + L.zeros_f[gi]) * std::fabs(xd[size_t(k)]);
                            act_err += L.scales[gi] * std::fabs(q - L.zeros_f[gi]) * 0.5 * dk[size_t(k)];
                        }
                        const double b1 = gamma * mag + 1e-30;
                        ASSERT_LE(std::fabs(y[size_t(n)] - ref8[size_t(n)]), b1)
                            << cpu::gptq_isa_name(isa) << " bits " << bits << " " << n_out << "x" << n_in << " gs "
                            << gs << " act " << act << " n " << n;
                        ASSERT_LE(std::fabs(y[size_t(n)] - ref32[size_t(n)]), act_err * (1 + 1e-6) + b1)
                            << cpu::gptq_isa_name(isa) << " bits " << bits << " " << n_out << "x" << n_in << " gs "
                            << gs << " act " << act << " n " << n;
                    }
                }
                ++cases;
            }
    EXPECT_EQ(cases, 4 * 9 * 2);
}

// The threaded op (rows split over the pool, m = 1..3, bias) gives exactly the per-row GEMV of
// the best kernel plus the bias: the split does not change any row's sums.
TEST(cpu_int4_gemv, threaded_op_equals_single_row_kernel) {
    std::mt19937                    rng(7);
    std::normal_distribution<float> nd;
    thread_pool                     pool(3);
    for (int bits : {3, 4, 8})
        for (int64_t m : {1, 2, 3}) {
            auto L = make(300, 256, 64, bits, true, rng);
            auto p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(), L.g_idx.data(),
                                                       300, 256, L.n_groups, bits);
            std::vector<float> x(static_cast<size_t>(m * 256)), bias(300), y(static_cast<size_t>(m * 300));
            for (auto& v : x) v = nd(rng);
            for (auto& v : bias) v = nd(rng);
            op_gptq_linear(ops_context{&pool, false, true}, x.data(), p, bias.data(), y.data(), m);
            for (int64_t i = 0; i < m; ++i) {
                q8                 a = quantize(x.data() + i * 256, p.layout());
                std::vector<float> yr(300);
                cpu::gptq_gemv_q8(p.layout(), a.row(), yr.data(), 0, 300, cpu::gptq_isa::GPTQ_ISA_BEST);
                for (int64_t n = 0; n < 300; ++n) ASSERT_EQ(y[size_t(i * 300 + n)], yr[size_t(n)] + bias[size_t(n)]);
            }
        }
}

// Prompt-sized calls (m >= 4) with int8 activations multiply the same int8-rounded activations
// (the best kernel's int8 GEMM, and the scalar kernel's F32 path: dequantize + sgemm): each row within F32 summation
// bounds of the double reference on its dequantized activations, so a row's result does not depend
// on the number of rows in the call.
TEST(cpu_int4_gemv, prompt_rows_use_the_same_rounded_activations) {
    std::mt19937                    rng(9);
    std::normal_distribution<float> nd;
    thread_pool                     pool(3);
    const double                    eps = std::ldexp(1.0, -24);
    for (int bits : {2, 4, 8})
        for (bool act : {false, true})
            for (int64_t m : {4, 9})
                for (auto isa : {cpu::gptq_isa::GPTQ_ISA_BEST, cpu::gptq_isa::GPTQ_ISA_SCALAR}) {  // GEMM, F32
                    const int64_t n_out = 70, n_in = 300;
                    auto          L = make(n_out, n_in, 128, bits, act, rng);
                    auto          p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                                        L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                    std::vector<float> x(static_cast<size_t>(m * n_in)), y(static_cast<size_t>(m * n_out));
                    for (auto& v : x) v = nd(rng);
                    cpu::gptq_linear(x.data(), p.layout(), nullptr, y.data(), m, &pool, true, isa);
                    const double gamma = n_in * eps / (1 - n_in * eps);
                    for (int64_t i = 0; i < m; ++i) {
                        q8                 a = quantize(x.data() + i * n_in, p.layout());
                        std::vector<float> xd, dk, ref(static_cast<size_t>(n_out));
                        dequantized(p, a, &xd, &dk);
                        cpu::gptq_linear_ref(xd.data(), L.codes.data(), L.scales.data(), L.zeros_f.data(),
                                             L.g_idx.data(), nullptr, ref.data(), 1, n_out, n_in);
                        for (int64_t n = 0; n < n_out; ++n) {
                            double mag = 0;
                            for (int64_t k = 0; k < n_in; ++k) {
                                const auto gi = static_cast<size_t>(L.g_idx[size_t(k)] * n_out + n);
                                mag += L.scales[gi] * std::fabs(L.codes[size_t(n * n_in + k)] - L.zeros_f[gi]) *
                                       std::fabs(xd[size_t(k)]);
                            }
                            // + one rounding of each dequantized weight s * (q - z)
                            ASSERT_LE(std::fabs(y[size_t(i * n_out + n)] - ref[size_t(n)]),
                                      (gamma + 2 * eps) * mag + 1e-30)
                                << cpu::gptq_isa_name(isa) << " bits " << bits << " act " << act << " m " << m
                                << " row " << i << " n " << n;
                        }
                    }
                }
}

// The int8 GEMM of prompt rows (AVX2 maddubs, AVX512-VNNI on 256 and 512 bits: tiles of 4 rows x 2
// outputs, the rows past a multiple of 4 through the GEMV) gives every row bit for bit what that GEMV gives it alone:
// bits 2/3/4/8, group sizes 32/64/128/-1 and an odd one, act-order, n_out odd (a last 1-output tile), K not a multiple
// of 32, row counts around the tile size, threaded.
TEST(cpu_int4_gemv, prompt_gemm_equals_the_gemv_bit_for_bit) {
    std::vector<cpu::gptq_isa> isas;  // every vector kernel has its GEMM (AVX2 maddubs, VNNI 256 / 512)
    for (auto i : {cpu::gptq_isa::GPTQ_ISA_AVX2, cpu::gptq_isa::GPTQ_ISA_VNNI, cpu::gptq_isa::GPTQ_ISA_AVX512})
        if (cpu::gptq_isa_available(i)) isas.push_back(i);
    if (isas.empty()) GTEST_SKIP() << "no vector int8 kernel on this CPU (prompts take the F32 path)";
    std::mt19937                    rng(11);
    std::normal_distribution<float> nd;
    thread_pool                     pool(3);
    int                             n_cases = 0;
    for (int bits : {2, 3, 4, 8})
        for (int64_t gs : {32, 64, 128, -1, 48})
            for (bool act : {false, true})
                for (int64_t m : {4, 5, 8, 13}) {
                    const int64_t n_out = 37, n_in = 300;
                    auto          L = make(n_out, n_in, gs, bits, act, rng);
                    auto          p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                                        L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                    std::vector<float> x(static_cast<size_t>(m * n_in)), y(static_cast<size_t>(m * n_out));
                    for (auto& v : x) v = nd(rng);
                    for (auto isa : isas) {
                        cpu::gptq_linear(x.data(), p.layout(), nullptr, y.data(), m, &pool, true, isa);
                        for (int64_t i = 0; i < m; ++i) {
                            q8                 a = quantize(x.data() + i * n_in, p.layout());
                            std::vector<float> yr(static_cast<size_t>(n_out));
                            cpu::gptq_gemv_q8(p.layout(), a.row(), yr.data(), 0, n_out, isa);
                            for (int64_t n = 0; n < n_out; ++n)
                                ASSERT_EQ(y[size_t(i * n_out + n)], yr[size_t(n)])
                                    << cpu::gptq_isa_name(isa) << " bits " << bits << " gs " << gs << " act " << act
                                    << " m " << m << " row " << i << " n " << n;
                        }
                    }
                    ++n_cases;
                }
    EXPECT_EQ(n_cases, 4 * 5 * 2 * 4);
}

namespace {
// Bitwise equality of two floats (NaN payloads included).
bool same_bits(float a, float b) {
    return std::memcmp(&a, &b, sizeof a) == 0;
}
}  // namespace

// The vector activation rounding (AVX2, AVX-512) gives the scalar reference's codes, chunk scales
// and group sums bit for bit, on layouts of awkward lengths (n_in not a multiple of 8/16/32, group
// sizes 32/64/128/-1 and odd ones, groups longer than a 128-row block), with and without
// act-order, on inputs with outliers, zero blocks, exact rounding ties, denormals and huge values.
// The output buffers start as garbage: every padded position must be written.
TEST(cpu_int4_gemv, activation_rounding_kernels_equal_the_reference_bit_for_bit) {
    std::mt19937                    rng(31);
    std::normal_distribution<float> nd;
    std::vector<cpu::gptq_isa>      isas;
    for (auto i : {cpu::gptq_isa::GPTQ_ISA_AVX2, cpu::gptq_isa::GPTQ_ISA_VNNI, cpu::gptq_isa::GPTQ_ISA_AVX512})
        if (cpu::gptq_isa_available(i)) isas.push_back(i);
    if (isas.empty()) GTEST_SKIP() << "no vector activation rounding on this CPU";
    int cases = 0;
    for (int64_t n_in : {1, 5, 8, 31, 33, 64, 100, 127, 129, 257, 300, 1000, 1543})
        for (int64_t gs : {32, 64, 128, -1, 7, 200})
            for (bool act : {false, true})
                for (int input = 0; input < 6; ++input) {
                    auto L = make(3, n_in, gs, 4, act, rng);
                    auto p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                               L.g_idx.data(), 3, n_in, L.n_groups, 4);
                    const cpu::gptq_cpu_layout l = p.layout();
                    std::vector<float>         x(static_cast<size_t>(n_in));
                    for (int64_t k = 0; k < n_in; ++k) {
                        float v = nd(rng);
                        switch (input) {
                            case 0:
                                v *= rng() % 50 == 0 ? 20.0f : 1.0f;
                                break;  // a few outliers
                            case 1:
                                v = k % 97 < 40 ? 0.0f : v;
                                break;  // zero runs (whole blocks)
                            case 2:
                                v = static_cast<float>(int(rng() % 255) - 127) * 0.5f;
                                break;  // ties x.5
                            case 3:
                                v *= 1e-40f;
                                break;  // denormals
                            case 4:
                                v *= 1e30f;
                                break;  // huge
                            default:
                                v = 0.0f;
                                break;  // all zero
                        }
                        x[size_t(k)] = v;
                    }
                    const q8 ref = quantize(x.data(), l);  // the default: SCALAR below is the same function
                    q8       sc  = quantize(x.data(), l);
                    cpu::gptq_quantize_activations(x.data(), l, sc.row(), cpu::gptq_isa::GPTQ_ISA_SCALAR);
                    for (auto isa : isas) {
                        q8 a{std::vector<int8_t>(ref.xq.size(), int8_t{0x55}), std::vector<float>(ref.d.size(), -7.0f),
                             std::vector<float>(ref.xsum.size(), -7.0f)};
                        cpu::gptq_quantize_activations(x.data(), l, a.row(), isa);
                        for (size_t i = 0; i < ref.xq.size(); ++i)
                            ASSERT_EQ(a.xq[i], sc.xq[i]) << cpu::gptq_isa_name(isa) << " n_in " << n_in << " gs " << gs
                                                         << " act " << act << " input " << input << " row " << i;
                        for (size_t i = 0; i < ref.d.size(); ++i)
                            ASSERT_TRUE(same_bits(a.d[i], sc.d[i]))
                                << cpu::gptq_isa_name(isa) << " n_in " << n_in << " gs " << gs << " chunk " << i;
                        for (size_t i = 0; i < ref.xsum.size(); ++i)
                            ASSERT_TRUE(same_bits(a.xsum[i], sc.xsum[i]))
                                << cpu::gptq_isa_name(isa) << " n_in " << n_in << " gs " << gs << " group " << i;
                    }
                    ++cases;
                }
    EXPECT_EQ(cases, 13 * 6 * 2 * 6);
}

// Linears of one input through op_gptq_linears (q/k/v and gate/up in the model): x rounded once
// for the layers of the same activation layout, one dispatch for all, and every output bit for bit
// what op_gptq_linear gives the layer alone: decode rows (m < 4) and prompts, int8 and F32
// products, with a pool and without, mixing layouts (an act-order layer, another group size, a
// different bit width) and odd output counts.
TEST(cpu_int4_gemv, shared_input_linears_equal_each_alone) {
    std::mt19937                    rng(41);
    std::normal_distribution<float> nd;
    thread_pool                     pool(3);
    const int64_t                   n_in = 320;
    struct spec {
        int64_t n_out, gs;
        int     bits;
        bool    act;
    };
    const std::vector<std::vector<spec>> sets = {
        {{320, 128, 4, false}, {160, 128, 4, false}, {160, 128, 4, false}},  // q/k/v
        {{77, 64, 4, false}, {33, 64, 8, false}},                            // gate/up, two bit widths
        {{50, 128, 4, true}, {50, 128, 4, true}, {19, 128, 3, false}},       // act-order: own permutations
        {{40, 32, 2, false}, {17, -1, 4, false}, {5, 64, 4, false}},         // three layouts
    };
    for (const auto& set : sets) {
        std::vector<gptq_packed_linear> ps;
        std::vector<std::vector<float>> biases;
        for (const spec& sp : set) {
            auto L = make(sp.n_out, n_in, sp.gs, sp.bits, sp.act, rng);
            ps.push_back(gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                           L.g_idx.data(), sp.n_out, n_in, L.n_groups, sp.bits));
            std::vector<float> b(static_cast<size_t>(sp.n_out));
            for (auto& v : b) v = nd(rng);
            biases.push_back(rng() % 2 ? b : std::vector<float>{});
        }
        for (int64_t m : {1, 2, 3, 4, 9})
            for (bool int8 : {true, false})
                for (thread_pool* tp : {&pool, static_cast<thread_pool*>(nullptr)}) {
                    std::vector<float> x(static_cast<size_t>(m * n_in));
                    for (auto& v : x) v = nd(rng);
                    const ops_context               ctx{tp, false, int8};
                    std::vector<std::vector<float>> together(set.size()), alone(set.size());
                    std::vector<gptq_linear_out>    outs;
                    for (size_t j = 0; j < set.size(); ++j) {
                        together[j].assign(static_cast<size_t>(m * set[j].n_out), -1.0f);
                        alone[j].assign(together[j].size(), -2.0f);
                        const float* b = biases[j].empty() ? nullptr : biases[j].data();
                        op_gptq_linear(ctx, x.data(), ps[j], b, alone[j].data(), m);
                        outs.push_back({&ps[j], b, together[j].data()});
                    }
                    op_gptq_linears(ctx, x.data(), outs, m);
                    for (size_t j = 0; j < set.size(); ++j)
                        for (size_t i = 0; i < alone[j].size(); ++i)
                            ASSERT_TRUE(same_bits(together[j][i], alone[j][i]))
                                << "layer " << j << " m " << m << " int8 " << int8 << " pool " << (tp != nullptr)
                                << " at " << i << ": " << together[j][i] << " vs " << alone[j][i];
                }
    }
}

// The tiled layout (bits <= 4, the one inference uses): every vector kernel (AVX2 maddubs,
// AVX512-VNNI on 256 and 512 bits) gives the plain scalar tiled kernel's result bit for bit (its
// integer block dots are exact in any order and the F32 chain per output is the same), through the
// threaded op at every row count (decode m = 1..3, prompt tiles of 4 rows and their remainders, a
// 512-row prompt) and through the single-row GEMV on output ranges that start inside the layer:
// bits 2/3/4, group sizes 32/64/128/-1 and odd ones, act-order, n_out below / at / past a tile of
// 16 and not a multiple of it, K not a multiple of 8 or 32.
TEST(cpu_int4_gemv, tiled_kernels_equal_the_tiled_scalar_kernel_bit_for_bit) {
    std::vector<cpu::gptq_isa> isas;
    for (auto i : {cpu::gptq_isa::GPTQ_ISA_AVX2, cpu::gptq_isa::GPTQ_ISA_VNNI, cpu::gptq_isa::GPTQ_ISA_AVX512})
        if (cpu::gptq_isa_available(i)) isas.push_back(i);
    if (isas.empty()) GTEST_SKIP() << "no vector int8 kernel on this CPU";
    std::mt19937                                             rng(51);
    std::normal_distribution<float>                          nd;
    thread_pool                                              pool(3);
    int                                                      n_cases = 0;
    const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes  = {
         {1, 32, 32},   {15, 96, 32}, {16, 200, 64},  {17, 128, 128}, {37, 1000, 128},
         {33, 257, -1}, {5, 33, 64},  {100, 300, 48}, {48, 41, 7},    {64, 520, 256}};
    for (int bits : {2, 3, 4})
        for (auto [n_out, n_in, gs] : shapes)
            for (bool act : {false, true}) {
                auto L = make(n_out, n_in, gs, bits, act, rng);
                auto p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                           L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                ASSERT_TRUE(p.tiled);
                const cpu::gptq_cpu_layout l = p.layout();
                std::vector<int64_t>       ms{1, 2, 3, 4, 5, 7, 8, 13};
                if (bits == 4 && !act && n_out <= 64) ms.push_back(512);
                for (int64_t m : ms) {
                    std::vector<float> x(static_cast<size_t>(m * n_in)), ref(static_cast<size_t>(m * n_out));
                    for (auto& v : x) v = nd(rng) * (rng() % 50 == 0 ? 20.0f : 1.0f);
                    std::vector<q8> a;
                    for (int64_t i = 0; i < m; ++i) {
                        a.push_back(quantize(x.data() + i * n_in, l));
                        cpu::gptq_gemv_q8(l, a.back().row(), ref.data() + i * n_out, 0, n_out,
                                          cpu::gptq_isa::GPTQ_ISA_SCALAR);
                    }
                    for (auto isa : isas)
                        for (thread_pool* tp : {&pool, static_cast<thread_pool*>(nullptr)}) {
                            std::vector<float> y(ref.size(), -3.0f);
                            cpu::gptq_linear(x.data(), l, nullptr, y.data(), m, tp, true, isa);
                            for (size_t e = 0; e < y.size(); ++e)
                                ASSERT_EQ(y[e], ref[e]) << cpu::gptq_isa_name(isa) << " bits " << bits << " " << n_out
                                                        << "x" << n_in << " gs " << gs << " act " << act << " m " << m
                                                        << " row " << e / size_t(n_out) << " n " << e % size_t(n_out);
                        }
                    // The single-row GEMV on ranges starting at a tile inside the layer (threads' slices).
                    for (auto isa : isas)
                        for (int64_t n0 = 0; n0 < n_out; n0 += cpu::k_gptq_tile) {
                            std::vector<float> y(static_cast<size_t>(n_out), -5.0f);
                            cpu::gptq_gemv_q8(l, a[0].row(), y.data(), n0, n_out, isa);
                            for (int64_t n = 0; n < n_out; ++n)
                                ASSERT_EQ(y[size_t(n)], n < n0 ? -5.0f : ref[size_t(n)])
                                    << cpu::gptq_isa_name(isa) << " n0 " << n0 << " n " << n;
                        }
                }
                ++n_cases;
            }
    EXPECT_EQ(n_cases, 3 * 10 * 2);
}

// The tiled layout holds the rows layout's codes, scales and zeros (every code read back, the F32
// dequantization bit for bit), and its kernel's outputs stay within the two F32 summation bounds of
// the rows layout's kernel (the reference, kept for bits 8): each is within gamma(n_ops) * sum |s|
// (q + z) |d xq| of the exact product of the same rounded activations (kernels_within_derived_bounds),
// so they are within twice that of each other.
TEST(cpu_int4_gemv, tiled_layout_equals_the_rows_layout) {
    std::mt19937                    rng(61);
    std::normal_distribution<float> nd;
    const double                    eps = std::ldexp(1.0, -24);
    for (int bits : {2, 3, 4})
        for (auto [n_out, n_in, gs] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
                 {1, 32, 32}, {17, 200, 64}, {37, 1000, 128}, {33, 257, -1}, {48, 41, 7}})
            for (bool act : {false, true}) {
                auto L = make(n_out, n_in, gs, bits, act, rng);
                auto t = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                           L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                auto r = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                           L.g_idx.data(), n_out, n_in, L.n_groups, bits, false);
                ASSERT_TRUE(t.tiled);
                ASSERT_FALSE(r.tiled);
                const cpu::gptq_cpu_layout lt = t.layout(), lr = r.layout();
                ASSERT_EQ(t.codes.size(), static_cast<size_t>(lt.n_tiles() * cpu::k_gptq_tile * t.k_pad / 2));
                for (int64_t n = 0; n < n_out; ++n) {
                    for (int64_t p = 0; p < t.k_pad; ++p)
                        ASSERT_EQ(cpu::gptq_code_at(lt, n, p), cpu::gptq_code_at(lr, n, p)) << "n " << n << " p " << p;
                    for (int64_t g = 0; g < t.n_groups; ++g) {
                        ASSERT_EQ(lt.scales[lt.sz_index(n, g)], lr.scales[lr.sz_index(n, g)]);
                        ASSERT_EQ(lt.zeros[lt.sz_index(n, g)], lr.zeros[lr.sz_index(n, g)]);
                    }
                }
                std::vector<float> wt(static_cast<size_t>(n_out * n_in)), wr(wt.size());
                t.dequantize(wt.data());
                r.dequantize(wr.data());
                for (size_t e = 0; e < wt.size(); ++e) ASSERT_TRUE(same_bits(wt[e], wr[e])) << "at " << e;
                std::vector<float> x(static_cast<size_t>(n_in));
                for (auto& v : x) v = nd(rng);
                q8                 a = quantize(x.data(), lt);
                std::vector<float> xd, dk, yt(static_cast<size_t>(n_out)), yr(yt.size());
                dequantized(t, a, &xd, &dk);
                const double n_ops = static_cast<double>(lt.k_pad / cpu::k_gptq_chunk + lt.n_groups + 8);
                const double gamma = n_ops * eps / (1 - n_ops * eps);
                cpu::gptq_gemv_q8(lt, a.row(), yt.data(), 0, n_out, cpu::gptq_isa::GPTQ_ISA_BEST);
                cpu::gptq_gemv_q8(lr, a.row(), yr.data(), 0, n_out, cpu::gptq_isa::GPTQ_ISA_BEST);
                for (int64_t n = 0; n < n_out; ++n) {
                    double mag = 0;
                    for (int64_t k = 0; k < n_in; ++k) {
                        const auto gi = static_cast<size_t>(L.g_idx[size_t(k)] * n_out + n);
                        mag +=
                            L.scales[gi] * (L.codes[size_t(n * n_in + k)] + L.zeros_f[gi]) * std::fabs(xd[size_t(k)]);
                    }
                    ASSERT_LE(std::fabs(yt[size_t(n)] - yr[size_t(n)]), 2 * gamma * mag + 1e-30)
                        << "bits " << bits << " " << n_out << "x" << n_in << " gs " << gs << " act " << act << " n "
                        << n;
                }
            }
}
