// Random GPTQ layers for the `cuda` kernel tests: codes, zeros and scales drawn on the host, packed
// into checkpoint tensors by io/gptq_pack (the writer's own packer), with the dequantized weights
// kept in double for a plain dequantize-then-matmul reference. Needs gptq_io (and cuda_test_util.h's
// includes); kept apart from cuda_test_util.h, which tests without io include too.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "io/gptq_pack.h"

namespace gptq::test {

struct gptq_layer {
    int64_t                n_out = 0, n_in = 0, n_groups = 0, group_size = 0;
    int                    bits   = 4;
    gptq_checkpoint_format format = gptq_checkpoint_format::GPTQ_FORMAT_V2;
    std::vector<uint8_t>   codes;  // [n_out, n_in]
    std::vector<int32_t>   zeros;  // [n_groups, n_out], as stored minus the v1 offset
    std::vector<int32_t>   qweight, qzeros, g_idx;
    std::vector<uint16_t>  scales;  // [n_groups, n_out] F16
    std::vector<double>    w;       // dequantized [n_out, n_in]: scale (code - zero), exact
};

// Pack L's codes/zeros/scales/g_idx into qweight/qzeros and fill w.
inline void gptq_layer_pack(gptq_layer& L) {
    L.qweight.resize(size_t(gptq_packed_words(L.n_in, L.bits) * L.n_out));
    L.qzeros.resize(size_t(L.n_groups * gptq_packed_words(L.n_out, L.bits)));
    gptq_pack_qweight(L.codes.data(), L.n_out, L.n_in, L.bits, L.qweight.data());
    EXPECT_TRUE(gptq_pack_qzeros(L.zeros.data(), L.n_groups, L.n_out, L.bits, L.format, L.qzeros.data()).is_ok());
    L.w.resize(size_t(L.n_out * L.n_in));
    for (int64_t n = 0; n < L.n_out; ++n)
        for (int64_t k = 0; k < L.n_in; ++k) {
            const int64_t g             = L.g_idx[size_t(k)];
            L.w[size_t(n * L.n_in + k)] = double(f16_to_f32(L.scales[size_t(g * L.n_out + n)])) *
                                          (double(L.codes[size_t(n * L.n_in + k)]) - L.zeros[size_t(g * L.n_out + n)]);
        }
}

// Random layer. act_order: g_idx from a random column order (groups non-contiguous in k). Scales in
// [0.002, 0.05) (normal F16 values), codes uniform, zeros mid-range (sym) or uniform (v1: >= 1).
inline gptq_layer gptq_layer_random(std::mt19937& rng, int64_t n_out, int64_t n_in, int64_t group_size, int bits,
                                    bool act_order, bool sym, gptq_checkpoint_format format) {
    gptq_layer L;
    L.n_out = n_out, L.n_in = n_in, L.group_size = group_size, L.bits = bits, L.format = format;
    const int64_t gs = group_size == -1 ? n_in : group_size;
    L.n_groups       = (n_in + gs - 1) / gs;
    std::vector<int32_t> order(static_cast<size_t>(n_in));
    std::iota(order.begin(), order.end(), 0);
    if (act_order) std::shuffle(order.begin(), order.end(), rng);
    L.g_idx.resize(size_t(n_in));
    for (int64_t i = 0; i < n_in; ++i) L.g_idx[size_t(order[size_t(i)])] = int32_t(i / gs);
    const int                          qmax = (1 << bits) - 1;
    std::uniform_int_distribution<int> code(0, qmax),
        zlo(format == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? 1 : 0, qmax);
    std::uniform_real_distribution<float> sc(0.002f, 0.05f);
    L.codes.resize(static_cast<size_t>(n_out * n_in));
    for (auto& c : L.codes) c = uint8_t(code(rng));
    L.zeros.resize(static_cast<size_t>(L.n_groups * n_out));
    for (auto& z : L.zeros) z = sym ? (1 << (bits - 1)) : zlo(rng);
    L.scales.resize(size_t(L.n_groups * n_out));
    for (auto& s : L.scales) s = f32_to_f16(sc(rng));
    gptq_layer_pack(L);
    return L;
}

// Output rows [n0, n1) of L as a layer of its own (same k, groups and g_idx).
inline gptq_layer gptq_layer_rows(const gptq_layer& L, int64_t n0, int64_t n1) {
    gptq_layer R;
    R.n_out = n1 - n0, R.n_in = L.n_in, R.n_groups = L.n_groups, R.group_size = L.group_size;
    R.bits = L.bits, R.format = L.format, R.g_idx = L.g_idx;
    R.codes.assign(L.codes.begin() + n0 * L.n_in, L.codes.begin() + n1 * L.n_in);
    for (int64_t g = 0; g < L.n_groups; ++g)
        for (int64_t n = n0; n < n1; ++n) {
            R.zeros.push_back(L.zeros[size_t(g * L.n_out + n)]);
            R.scales.push_back(L.scales[size_t(g * L.n_out + n)]);
        }
    gptq_layer_pack(R);
    return R;
}

// Reference y[m, n_out] = x[m, n_in] w^T (+ bias) in double, w given [n_out, n_in]; rows of x split
// over the host's threads (the large-m cases are ~1e9 multiply-adds).
inline std::vector<double> gptq_reference(const std::vector<double>& w, int64_t n_out, int64_t n_in,
                                          const std::vector<uint16_t>& x, int64_t m,
                                          const std::vector<uint16_t>& bias) {
    std::vector<double> y(static_cast<size_t>(m * n_out));
    std::vector<double> xd(x.size());
    for (size_t i = 0; i < x.size(); ++i) xd[i] = f16_to_f32(x[i]);
    const int64_t            n_thr = std::max<int64_t>(1, std::min<int64_t>(m, std::thread::hardware_concurrency()));
    std::vector<std::thread> pool;
    for (int64_t t = 0; t < n_thr; ++t)
        pool.emplace_back([&, t] {
            for (int64_t r = t; r < m; r += n_thr)
                for (int64_t n = 0; n < n_out; ++n) {
                    double        s  = bias.empty() ? 0.0 : f16_to_f32(bias[size_t(n)]);
                    const double* wr = w.data() + n * n_in;
                    const double* xr = xd.data() + r * n_in;
                    for (int64_t k = 0; k < n_in; ++k) s += xr[k] * wr[k];
                    y[size_t(r * n_out + n)] = s;
                }
        });
    for (auto& th : pool) th.join();
    return y;
}

// The weights rounded to F16 once, f16(scale (q - zero)), as kernels that dequantize to F16 use them
// (L.w is exact in F32: an 11-bit scale times an integer of at most 5 bits).
inline std::vector<double> gptq_weights_f16(const gptq_layer& L) {
    std::vector<double> w(L.w.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = f16_to_f32(f32_to_f16(float(L.w[i])));
    return w;
}

inline std::string gptq_layer_describe(const gptq_layer& L, int64_t m, bool act, bool sym, uint32_t seed) {
    return "bits=" + std::to_string(L.bits) + " gs=" + std::to_string(L.group_size) + " act=" + std::to_string(act) +
           " sym=" + std::to_string(sym) + " v" + (L.format == gptq_checkpoint_format::GPTQ_FORMAT_V1 ? "1" : "2") +
           " m=" + std::to_string(m) + " n_out=" + std::to_string(L.n_out) + " n_in=" + std::to_string(L.n_in) +
           " seed=" + std::to_string(seed);
}

}  // namespace gptq::test
