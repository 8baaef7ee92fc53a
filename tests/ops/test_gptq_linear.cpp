// GPTQ linear with dequantization on the fly, F32 products (no int8 activations: those are
// test_cpu_int4_gemv): the sorted/padded layout's dequantize + sgemm path and the reference kernels
// against the plain reference on the original layout, with trivial and act-order g_idx, uneven
// groups, odd shapes and every bit width's range.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/thread_pool.h"
#include "kernels/cpu/gptq_linear.h"
#include "ops/gptq_linear.h"

using namespace gptq;

namespace {

// Sums of up to a few hundred F32 products, reordered by groups: 1e-4 of the output magnitude.
constexpr double k_tol = 1e-4;

struct random_layer {
    int64_t              n_out, n_in, n_groups;
    std::vector<uint8_t> codes;  // [n_out, n_in]
    std::vector<float>   scales;
    std::vector<int32_t> zeros, g_idx;
    std::vector<float>   zeros_f;
};

random_layer make(int64_t n_out, int64_t n_in, int64_t gs, int bits, bool act_order, std::mt19937& rng) {
    random_layer L{n_out, n_in, (n_in + gs - 1) / gs, {}, {}, {}, {}, {}};
    const int    maxq = (1 << bits) - 1;
    L.codes.resize(static_cast<size_t>(n_out * n_in));
    for (auto& c : L.codes) c = static_cast<uint8_t>(rng() % (maxq + 1));
    std::uniform_real_distribution<float> sd(0.001f, 0.05f);
    L.scales.resize(static_cast<size_t>(L.n_groups * n_out));
    for (auto& s : L.scales) s = sd(rng);
    L.zeros.resize(L.scales.size());
    for (auto& z : L.zeros) z = static_cast<int32_t>(rng() % (maxq + 1));
    L.zeros_f.assign(L.zeros.begin(), L.zeros.end());
    L.g_idx.resize(static_cast<size_t>(n_in));
    for (int64_t k = 0; k < n_in; ++k) L.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    if (act_order) std::shuffle(L.g_idx.begin(), L.g_idx.end(), rng);
    return L;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double scale = 1e-30, diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
        diff  = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    }
    return diff / scale;
}

}  // namespace

TEST(gptq_linear, kernels_match_reference) {
    std::mt19937                    rng(21);
    thread_pool                     pool(3);
    std::normal_distribution<float> nd;
    int                             cases = 0;
    for (int bits : {2, 3, 4, 8})
        for (auto [n_out, n_in, gs] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
                 {8, 32, 32}, {24, 96, 32}, {64, 200, 64}, {100, 128, 128}, {136, 96, 96}, {8, 40, 7}})
            for (bool act : {false, true})
                for (int64_t m : {1, 2, 3, 4, 7}) {
                    auto               L = make(n_out, n_in, gs, bits, act, rng);
                    std::vector<float> x(static_cast<size_t>(m * n_in)), bias(static_cast<size_t>(n_out));
                    for (auto& v : x) v = nd(rng);
                    for (auto& v : bias) v = nd(rng);
                    std::vector<float> ref(static_cast<size_t>(m * n_out));
                    cpu::gptq_linear_ref(x.data(), L.codes.data(), L.scales.data(), L.zeros_f.data(), L.g_idx.data(),
                                         bias.data(), ref.data(), m, n_out, n_in);
                    auto p = gptq_packed_linear::from_unpacked(L.codes.data(), L.scales.data(), L.zeros.data(),
                                                               L.g_idx.data(), n_out, n_in, L.n_groups, bits);
                    EXPECT_EQ(p.perm.empty(), !act || n_in == gs);
                    std::vector<float> fast(ref.size()), portable(ref.size());
                    op_gptq_linear(ops_context{&pool, false}, x.data(), p, bias.data(), fast.data(), m);
                    op_gptq_linear(ops_context{nullptr, true}, x.data(), p, bias.data(), portable.data(), m);
                    ASSERT_LT(rel_diff(fast, ref), k_tol)
                        << bits << " " << n_out << "x" << n_in << " gs " << gs << " act " << act << " m " << m;
                    ASSERT_LT(rel_diff(portable, ref), k_tol) << bits << " " << n_out << "x" << n_in << " m " << m;
                    // Dequantizing the sorted layout gives back the original matrix exactly.
                    std::vector<float> w(static_cast<size_t>(n_out * n_in));
                    p.dequantize(w.data());
                    for (int64_t n = 0; n < n_out; n += 7)
                        for (int64_t k = 0; k < n_in; k += 5) {
                            const auto g = static_cast<size_t>(L.g_idx[static_cast<size_t>(k)] * n_out + n);
                            ASSERT_EQ(w[static_cast<size_t>(n * n_in + k)],
                                      L.scales[g] * (static_cast<float>(L.codes[static_cast<size_t>(n * n_in + k)]) -
                                                     L.zeros_f[g]));
                        }
                    ++cases;
                }
    EXPECT_EQ(cases, 4 * 6 * 2 * 5);
}
