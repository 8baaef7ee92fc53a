// kernels/cpu: every threaded/BLAS kernel against its plain reference on fresh random inputs, over
// shape sweeps that include 1, odd sizes and sizes that are not multiples of the block sizes
// (linear slices of 16 features, attention blocks of 32 queries, 8-lane partial sums).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/norm.h"
#include "kernels/cpu/rope.h"

using namespace gptq;

namespace {

// Tolerances. F32 has eps = 1.2e-7; the references accumulate in double.
// linear: error per output relative to sum_l |x_l w_l| (the sum's condition); blocked F32 sums of
// up to ~300 terms stay within a few 1e-6 of that, so 1e-5 leaves room without hiding a wrong term.
constexpr double k_linear_tol = 1e-5;
// rms_norm: one F32 sum of squares (8 lanes) and a reciprocal sqrt: a few ulps per element.
constexpr double k_rms_norm_tol = 5e-6;
// rope: the same F32 expressions in both versions; only operation order could differ.
constexpr double k_rope_tol = 1e-6;
// attention: F32 dot products of head_dim terms, a softmax and a weighted sum, relative to max|v|.
constexpr double k_attention_tol = 2e-5;
// silu * up, softmax, log-softmax: expf/logf against double, a few ulps (softmax sums 1000s of terms).
constexpr double k_activation_tol = 1e-5;

std::vector<float> random_vec(std::mt19937& rng, size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float>              v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

thread_pool& pool3() {
    static thread_pool p(3);  // 3 threads: uneven splits of every size
    return p;
}

}  // namespace

TEST(kernels_cpu, linear_blas_matches_reference) {
    std::mt19937 rng(1);
    int          n_cases = 0;
    for (int64_t m : {1, 2, 3, 4, 17, 64, 100})
        for (int64_t n : {1, 5, 16, 33, 100, 257})
            for (int64_t k : {1, 7, 64, 129, 300})
                for (bool with_bias : {false, true}) {
                    auto               x = random_vec(rng, m * k), w = random_vec(rng, n * k), b = random_vec(rng, n);
                    std::vector<float> y_ref(m * n), y(m * n, 123.0f);
                    const float*       bias = with_bias ? b.data() : nullptr;
                    cpu::linear_ref(x.data(), w.data(), bias, y_ref.data(), m, n, k);
                    cpu::linear_blas(x.data(), w.data(), bias, y.data(), m, n, k, &pool3());
                    for (int64_t i = 0; i < m; ++i)
                        for (int64_t j = 0; j < n; ++j) {
                            double cond = with_bias ? std::fabs(b[j]) : 0.0;
                            for (int64_t l = 0; l < k; ++l) cond += std::fabs(x[i * k + l] * w[j * k + l]);
                            ASSERT_LE(std::fabs(y[i * n + j] - y_ref[i * n + j]), k_linear_tol * cond)
                                << "m=" << m << " n=" << n << " k=" << k << " i=" << i << " j=" << j;
                        }
                    ++n_cases;
                }
    EXPECT_EQ(n_cases, 420);
}

// F16 weights kept F16: the F16C GEMV (m <= 4, weights converted in registers, 16- or 8-lane
// partial sums with a scalar tail for k % 16) and, for m > 4, the AVX-512 panel GEMM (8-row tiles
// with partial ones, 32-output panels with masked edges, k-blocks of 256) or elsewhere the
// convert-a-tile + sgemm path (tiles of 64 rows), against the double reference on the exactly
// converted weights; same bound as F32.
TEST(kernels_cpu, linear_f16_matches_reference) {
    std::mt19937 rng(11);
    int          n_cases = 0;
    for (int64_t m : {1, 2, 3, 4, 5, 9, 17})
        for (int64_t n : {1, 5, 16, 67, 130})
            for (int64_t k : {0, 1, 7, 8, 15, 16, 17, 33, 300, 513})
                for (bool with_bias : {false, true}) {
                    auto x = random_vec(rng, m * k), wf = random_vec(rng, n * k), b = random_vec(rng, n);
                    std::vector<uint16_t> w(wf.size());
                    for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_f16(wf[i]);
                    std::vector<float> y_ref(m * n), y(m * n, 123.0f);
                    const float*       bias = with_bias ? b.data() : nullptr;
                    cpu::linear_f16_ref(x.data(), w.data(), bias, y_ref.data(), m, n, k);
                    cpu::linear_f16(x.data(), w.data(), bias, y.data(), m, n, k, &pool3());
                    for (int64_t i = 0; i < m; ++i)
                        for (int64_t j = 0; j < n; ++j) {
                            double cond = with_bias ? std::fabs(b[j]) : 0.0;
                            for (int64_t l = 0; l < k; ++l) cond += std::fabs(x[i * k + l] * f16_to_f32(w[j * k + l]));
                            ASSERT_LE(std::fabs(y[i * n + j] - y_ref[i * n + j]), k_linear_tol * cond)
                                << "m=" << m << " n=" << n << " k=" << k << " i=" << i << " j=" << j;
                        }
                    ++n_cases;
                }
    EXPECT_EQ(n_cases, 7 * 5 * 10 * 2);
}

// The AVX-512 panel GEMM computes each output as one FMA chain over k, whatever the call's row
// count, tile or thread: rows of a 23-row call equal, bit for bit, the same rows in calls of 5-8.
TEST(kernels_cpu, linear_f16_prompt_rows_do_not_depend_on_m) {
    if (cpu::f16_best_isa() != cpu::f16_isa::AVX512) GTEST_SKIP() << "the sgemm path makes no such promise";
    std::mt19937          rng(13);
    const int64_t         m = 23, n = 70, k = 600;
    auto                  x = random_vec(rng, m * k), wf = random_vec(rng, n * k);
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_f16(wf[i]);
    std::vector<float> all(m * n);
    cpu::linear_f16(x.data(), w.data(), nullptr, all.data(), m, n, k, &pool3());
    for (int64_t i0 = 0, mb = 5; i0 + mb <= m; i0 += mb, mb = 5 + (mb - 4) % 4) {
        std::vector<float> part(mb * n);
        cpu::linear_f16(x.data() + i0 * k, w.data(), nullptr, part.data(), mb, n, k, nullptr);
        for (int64_t j = 0; j < mb * n; ++j) ASSERT_EQ(part[j], all[i0 * n + j]) << "rows from " << i0 << " j " << j;
    }
}

// Several F16 linears of one input in one dispatch (q/k/v, gate/up of a dense layer): each output
// bit for bit what linear_f16 gives the layer alone, decode rows (GEMV) and prompts (GEMM), with
// and without the pool, output counts off the work unit (16 / 64) and a bias on some.
TEST(kernels_cpu, linears_f16_equal_each_alone) {
    std::mt19937                       rng(17);
    const int64_t                      k = 200;
    const std::vector<int64_t>         ns{70, 33, 16, 1};
    std::vector<std::vector<uint16_t>> ws;
    std::vector<std::vector<float>>    biases;
    for (int64_t n : ns) {
        auto                  wf = random_vec(rng, n * k);
        std::vector<uint16_t> w(wf.size());
        for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_f16(wf[i]);
        ws.push_back(w);
        biases.push_back(n % 2 ? random_vec(rng, n) : std::vector<float>{});
    }
    for (int64_t m : {1, 2, 4, 5, 19})
        for (thread_pool* tp : {&pool3(), static_cast<thread_pool*>(nullptr)}) {
            const auto                       x = random_vec(rng, m * k);
            std::vector<std::vector<float>>  together(ns.size()), alone(ns.size());
            std::vector<cpu::linear_f16_job> jobs;
            for (size_t j = 0; j < ns.size(); ++j) {
                together[j].assign(static_cast<size_t>(m * ns[j]), -1.0f);
                alone[j].assign(together[j].size(), -2.0f);
                const float* b = biases[j].empty() ? nullptr : biases[j].data();
                cpu::linear_f16(x.data(), ws[j].data(), b, alone[j].data(), m, ns[j], k, tp);
                jobs.push_back({ws[j].data(), b, together[j].data(), ns[j]});
            }
            cpu::linears_f16(x.data(), jobs.data(), static_cast<int>(jobs.size()), m, k, tp);
            for (size_t j = 0; j < ns.size(); ++j)
                for (size_t e = 0; e < alone[j].size(); ++e)
                    ASSERT_EQ(together[j][e], alone[j][e]) << "layer " << j << " m " << m << " at " << e;
        }
}

TEST(kernels_cpu, linear_blas_small_batches_walk_output_blocks) {
    // m = 2..4 go through the sgemv path in blocks of output features (k_gemv_block_bytes = 256 KiB
    // of weights: 64 rows at k = 1024), so n = 1000 spans 16 blocks, the last one partial.
    std::mt19937  rng(7);
    const int64_t n = 1000, k = 1024;
    for (int64_t m : {2, 3, 4})
        for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &pool3()}) {
            auto               x = random_vec(rng, m * k), w = random_vec(rng, n * k), b = random_vec(rng, n);
            std::vector<float> y_ref(m * n), y(m * n, 123.0f);
            cpu::linear_ref(x.data(), w.data(), b.data(), y_ref.data(), m, n, k);
            cpu::linear_blas(x.data(), w.data(), b.data(), y.data(), m, n, k, pool);
            for (int64_t i = 0; i < m * n; ++i) {
                const int64_t r = i / n, j = i % n;
                double        cond = std::fabs(b[j]);
                for (int64_t l = 0; l < k; ++l) cond += std::fabs(x[r * k + l] * w[j * k + l]);
                ASSERT_LE(std::fabs(y[i] - y_ref[i]), k_linear_tol * cond) << "m=" << m << " i=" << i;
            }
        }
}

TEST(kernels_cpu, linear_serial_equals_threaded) {
    std::mt19937       rng(2);
    const int64_t      m = 9, n = 70, k = 31;
    auto               x = random_vec(rng, m * k), w = random_vec(rng, n * k);
    std::vector<float> a(m * n), b(m * n);
    cpu::linear_blas(x.data(), w.data(), nullptr, a.data(), m, n, k, nullptr);
    cpu::linear_blas(x.data(), w.data(), nullptr, b.data(), m, n, k, &pool3());
    EXPECT_EQ(a, b);  // slicing the output features does not change any sum
}

TEST(kernels_cpu, rms_norm_matches_reference) {
    std::mt19937 rng(3);
    for (int64_t rows : {1, 2, 5, 64})
        for (int64_t dim : {1, 7, 8, 9, 64, 257, 512}) {
            auto               x = random_vec(rng, rows * dim, 3.0f), w = random_vec(rng, dim);
            std::vector<float> y_ref(rows * dim), y(x);
            cpu::rms_norm_ref(x.data(), w.data(), y_ref.data(), rows, dim, 1e-5f);
            cpu::rms_norm(y.data(), w.data(), y.data(), rows, dim, 1e-5f, &pool3());  // in place
            for (int64_t i = 0; i < rows * dim; ++i)
                ASSERT_NEAR(y[i], y_ref[i], k_rms_norm_tol * (std::fabs(y_ref[i]) + 1e-6))
                    << "rows=" << rows << " dim=" << dim << " i=" << i;
        }
}

TEST(kernels_cpu, rms_norm_reference_is_the_formula) {
    // A row whose RMS is exactly 2: y = w * x / 2 (eps 0).
    const std::vector<float> x = {2, -2, 2, -2}, w = {1, 2, 3, 4};
    std::vector<float>       y(4);
    cpu::rms_norm_ref(x.data(), w.data(), y.data(), 1, 4, 0.0f);
    EXPECT_EQ(y, (std::vector<float>{1, -2, 3, -4}));
}

TEST(kernels_cpu, rope_matches_reference) {
    std::mt19937 rng(4);
    for (int64_t n_tokens : {1, 3, 8, 33})
        for (int64_t n_heads : {1, 3, 4})
            for (int64_t head_dim : {2, 6, 64}) {
                const int64_t stride = n_heads * head_dim + 5;  // padding after the heads stays untouched
                auto          x      = random_vec(rng, n_tokens * stride);
                auto          c      = random_vec(rng, n_tokens * head_dim / 2);
                auto          s      = random_vec(rng, n_tokens * head_dim / 2);
                auto          a = x, b = x;
                cpu::rope_ref(a.data(), c.data(), s.data(), n_tokens, n_heads, head_dim, stride);
                cpu::rope(b.data(), c.data(), s.data(), n_tokens, n_heads, head_dim, stride, &pool3());
                for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(a[i], b[i], k_rope_tol * (std::fabs(a[i]) + 1));
                for (int64_t t = 0; t < n_tokens; ++t)
                    for (int64_t p = n_heads * head_dim; p < stride; ++p)
                        ASSERT_EQ(b[t * stride + p], x[t * stride + p]);
            }
}

TEST(kernels_cpu, rope_rotates_pairs_half_apart) {
    // head_dim 4: pairs (0,2) and (1,3); a 90-degree turn on pair 0 only.
    std::vector<float>       x = {1, 10, 2, 20};
    const std::vector<float> c = {0, 1}, s = {1, 0};
    cpu::rope_ref(x.data(), c.data(), s.data(), 1, 1, 4, 4);
    EXPECT_EQ(x, (std::vector<float>{-2, 10, 1, 20}));
}

namespace {
void check_attention(std::mt19937& rng, cpu::attention_shape s) {
    s.q_stride           = s.n_head * s.head_dim + 3;
    s.kv_stride          = s.n_head_kv * s.head_dim + 1;
    s.out_stride         = s.n_head * s.head_dim + 2;
    s.scale              = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    auto               q = random_vec(rng, s.n_q * s.q_stride, 1.5f);
    auto               k = random_vec(rng, s.n_kv * s.kv_stride, 1.5f);
    auto               v = random_vec(rng, s.n_kv * s.kv_stride);
    std::vector<float> o_ref(s.n_q * s.out_stride, 7.0f), o(s.n_q * s.out_stride, 7.0f);
    cpu::attention_ref(q.data(), k.data(), v.data(), o_ref.data(), s);
    cpu::attention_blas(q.data(), k.data(), v.data(), o.data(), s, &pool3());
    float vmax = 0;
    for (float x : v) vmax = std::max(vmax, std::fabs(x));
    for (size_t i = 0; i < o.size(); ++i)
        ASSERT_NEAR(o[i], o_ref[i], k_attention_tol * vmax)
            << "n_q=" << s.n_q << " n_kv=" << s.n_kv << " q_pos0=" << s.q_pos0 << " heads=" << s.n_head << "/"
            << s.n_head_kv << " hd=" << s.head_dim << " window=" << s.window << " i=" << i;
}
}  // namespace

TEST(kernels_cpu, attention_blas_matches_reference) {
    std::mt19937 rng(5);
    struct heads {
        int64_t h, hkv, hd;
    };
    int n_cases = 0;
    for (heads hs : {heads{4, 2, 8}, heads{3, 3, 6}, heads{8, 1, 64}, heads{2, 1, 2}})
        for (int64_t window : {0, 1, 3, 40}) {
            cpu::attention_shape s;
            s.n_head    = hs.h;
            s.n_head_kv = hs.hkv;
            s.head_dim  = hs.hd;
            s.window    = window;
            for (int64_t n : {1, 5, 31, 32, 33, 70}) {  // prefill
                s.n_q = s.n_kv = n;
                s.q_pos0       = 0;
                check_attention(rng, s);
                ++n_cases;
            }
            for (int64_t n_kv : {1, 2, 45}) {  // one decode step
                s.n_q    = 1;
                s.n_kv   = n_kv;
                s.q_pos0 = n_kv - 1;
                check_attention(rng, s);
                ++n_cases;
            }
            s.n_q    = 37;  // a chunk after a prefix
            s.n_kv   = 50;
            s.q_pos0 = 13;
            check_attention(rng, s);
            ++n_cases;
        }
    EXPECT_EQ(n_cases, 160);
}

namespace {
// Attention over an F16 cache (attention_f16, on instruction set isa) against two references on
// the same random inputs: attention_ref on the F16-rounded keys/values (the same function: F32
// sums against double, k_attention_tol), and attention_ref on the unrounded F32 keys/values, within
// the rounding's bound: a key rounded by rel. 2^-11 moves a score by at most
// D = scale 2^-11 sum_d |q_d k_d| (soft-capping is 1-Lipschitz), which moves the softmax weights
// by at most e^{2D} - 1 in sum; a value rounded by rel. 2^-11 moves the output by 2^-11 max|v|.
void check_attention_f16(std::mt19937& rng, cpu::attention_shape s, cpu::f16_isa isa) {
    s.q_stride              = s.n_head * s.head_dim + 3;
    s.kv_stride             = s.n_head_kv * s.head_dim + 1;
    s.out_stride            = s.n_head * s.head_dim + 2;
    s.scale                 = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    auto                  q = random_vec(rng, s.n_q * s.q_stride, 1.5f);
    auto                  k = random_vec(rng, s.n_kv * s.kv_stride, 1.5f);
    auto                  v = random_vec(rng, s.n_kv * s.kv_stride);
    std::vector<uint16_t> k16(k.size()), v16(v.size());
    f32_to_f16_row(k.data(), k16.data(), k.size());
    f32_to_f16_row(v.data(), v16.data(), v.size());
    std::vector<float> o_ref16(s.n_q * s.out_stride, 7.0f), o_ref32(o_ref16), o(o_ref16);
    cpu::attention_f16_ref(q.data(), k16.data(), v16.data(), o_ref16.data(), s);
    cpu::attention_ref(q.data(), k.data(), v.data(), o_ref32.data(), s);
    cpu::attention_f16(q.data(), k16.data(), v16.data(), o.data(), s, &pool3(), isa);
    float vmax = 0;
    for (float x : v) vmax = std::max(vmax, std::fabs(x));
    double qk_max = 0;  // max over query rows, heads, keys of sum_d |q_d k_d|
    for (int64_t i = 0; i < s.n_q; ++i)
        for (int64_t h = 0; h < s.n_head; ++h)
            for (int64_t j = 0; j < s.n_kv; ++j) {
                double a = 0;
                for (int64_t d = 0; d < s.head_dim; ++d)
                    a += std::fabs(q[i * s.q_stride + h * s.head_dim + d] *
                                   k[j * s.kv_stride + h / (s.n_head / s.n_head_kv) * s.head_dim + d]);
                qk_max = std::max(qk_max, a);
            }
    const double d_score = s.scale * std::ldexp(1.0, -11) * qk_max;
    const double bound   = vmax * (std::expm1(2 * d_score) + std::ldexp(1.0, -11) + k_attention_tol);
    for (int64_t i = 0; i < s.n_q; ++i)
        for (int64_t c = 0; c < s.out_stride; ++c) {
            const size_t x = static_cast<size_t>(i * s.out_stride + c);
            if (c >= s.n_head * s.head_dim) {  // the row's padding is not written
                ASSERT_EQ(o[x], 7.0f);
                continue;
            }
            ASSERT_NEAR(o[x], o_ref16[x], k_attention_tol * vmax)
                << cpu::f16_isa_name(isa) << " n_q=" << s.n_q << " n_kv=" << s.n_kv << " q_pos0=" << s.q_pos0
                << " heads=" << s.n_head << "/" << s.n_head_kv << " hd=" << s.head_dim << " window=" << s.window
                << " softcap=" << s.softcap << " x=" << x;
            ASSERT_NEAR(o[x], o_ref32[x], bound) << cpu::f16_isa_name(isa) << " n_q=" << s.n_q << " n_kv=" << s.n_kv
                                                 << " hd=" << s.head_dim << " x=" << x;
        }
}
}  // namespace

TEST(kernels_cpu, attention_f16_matches_reference) {
    std::mt19937 rng(12);
    struct heads {
        int64_t h, hkv, hd;
    };
    int n_isa = 0;
    for (cpu::f16_isa isa : {cpu::f16_isa::PORTABLE, cpu::f16_isa::AVX2, cpu::f16_isa::AVX512}) {
        if (!cpu::f16_isa_supported(isa)) continue;
        ++n_isa;
        int n_cases = 0;
        // GQA groups of 1-7 (the decode rows take the group's heads 4 at a time), head_dim with
        // tails of every kind (2, 6: below a vector; 66, 72, 80: past the 64-column blocks).
        for (heads hs : {heads{4, 2, 8}, heads{3, 3, 6}, heads{8, 1, 64}, heads{2, 1, 2}, heads{7, 1, 66},
                         heads{6, 2, 80}, heads{4, 4, 72}, heads{2, 1, 256}})
            for (int64_t window : {0, 3, 40})
                for (float cap : {0.0f, 5.0f}) {
                    cpu::attention_shape s;
                    s.n_head    = hs.h;
                    s.n_head_kv = hs.hkv;
                    s.head_dim  = hs.hd;
                    s.window    = window;
                    s.softcap   = cap;
                    for (int64_t n : {1, 5, 33}) {  // prefill
                        s.n_q = s.n_kv = n;
                        s.q_pos0       = 0;
                        check_attention_f16(rng, s, isa);
                        ++n_cases;
                    }
                    for (int64_t n_kv : {1, 2, 45, 130}) {  // one decode step
                        s.n_q    = 1;
                        s.n_kv   = n_kv;
                        s.q_pos0 = n_kv - 1;
                        check_attention_f16(rng, s, isa);
                        ++n_cases;
                    }
                    s.n_q    = 37;  // a chunk after a prefix (its last block holds one query)
                    s.n_kv   = 50;
                    s.q_pos0 = 13;
                    check_attention_f16(rng, s, isa);
                    ++n_cases;
                }
        EXPECT_EQ(n_cases, 8 * 3 * 2 * 8);
    }
    EXPECT_GE(n_isa, 1);
}

TEST(kernels_cpu, attention_first_query_copies_first_value) {
    // Query 0 sees only key 0: its output is v[0] whatever the scores.
    cpu::attention_shape s;
    s.n_q = s.n_kv = 2;
    s.n_head = s.n_head_kv = 1;
    s.head_dim = s.q_stride = s.kv_stride = s.out_stride = 2;
    const std::vector<float> q = {1, 2, 3, 4}, k = {5, 6, 7, 8}, v = {0.5f, -1.5f, 9, 9};
    std::vector<float>       o(4);
    cpu::attention_blas(q.data(), k.data(), v.data(), o.data(), s, nullptr);
    EXPECT_EQ(o[0], 0.5f);
    EXPECT_EQ(o[1], -1.5f);
}

TEST(kernels_cpu, activations_match_reference) {
    std::mt19937 rng(6);
    for (int64_t n : {1, 7, 100, 20000}) {  // 20000: above the threaded threshold
        auto               g = random_vec(rng, n, 4.0f), u = random_vec(rng, n);
        std::vector<float> a(n), b(n);
        cpu::silu_mul_ref(g.data(), u.data(), a.data(), n);
        cpu::silu_mul(g.data(), u.data(), b.data(), n, &pool3());
        for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(a[i], b[i], k_activation_tol * (std::fabs(a[i]) + 1e-6));
        // The vector exp (generation's path), also past its clamp and on exact zeros.
        for (int64_t i = 0; i < n; i += 5)
            g[i] = std::array<float, 6>{0.0f, 90.0f, -90.0f, 200.0f, -200.0f, -0.0f}[i % 6];
        cpu::silu_mul_ref(g.data(), u.data(), a.data(), n);
        for (thread_pool* tp : {&pool3(), static_cast<thread_pool*>(nullptr)}) {
            cpu::silu_mul_fast(g.data(), u.data(), b.data(), n, tp);
            for (int64_t i = 0; i < n; ++i)
                ASSERT_NEAR(a[i], b[i], k_activation_tol * (std::fabs(a[i]) + 1e-6)) << "fast, g " << g[i];
        }
    }
    for (int64_t rows : {1, 3, 40})
        for (int64_t cols : {1, 2, 9, 1000, 8192}) {
            auto               x = random_vec(rng, rows * cols, 5.0f);
            std::vector<float> a(x.size()), b(x.size());
            cpu::softmax_rows_ref(x.data(), a.data(), rows, cols);
            cpu::softmax_rows(x.data(), b.data(), rows, cols, &pool3());
            for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(a[i], b[i], k_activation_tol * (a[i] + 1e-7));
            cpu::log_softmax_rows_ref(x.data(), a.data(), rows, cols);
            b = x;
            cpu::log_softmax_rows(b.data(), b.data(), rows, cols, &pool3());  // in place
            for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(a[i], b[i], k_activation_tol * (std::fabs(a[i]) + 1));
        }
}

TEST(kernels_cpu, log_softmax_of_equal_logits_is_minus_log_n) {
    const std::vector<float> x(10, 3.25f);
    std::vector<float>       y(10);
    cpu::log_softmax_rows(x.data(), y.data(), 1, 10, nullptr);
    for (float v : y) EXPECT_NEAR(v, -std::log(10.0), 1e-6);
}

TEST(kernels_cpu, gelu_tanh_mul_matches_reference) {
    // The F32 version against the double reference. Below x ~ -3, 1 + tanh(inner) cancels in F32
    // (torch's own F32 result shares it), so the bound adds F32 rounding of that sum: 0.5 |x| |up| eps.
    std::mt19937 rng(8);
    for (int64_t n : {1, 7, 100, 20000}) {  // 20000: above the threaded threshold
        auto               g = random_vec(rng, n, 4.0f), u = random_vec(rng, n);
        std::vector<float> a(n), b(u);
        cpu::gelu_tanh_mul_ref(g.data(), u.data(), a.data(), n);
        cpu::gelu_tanh_mul(g.data(), b.data(), b.data(), n, &pool3());  // y aliases up
        for (int64_t i = 0; i < n; ++i) {
            const double cancel = 0.5 * std::fabs(g[i] * u[i]) * 2.4e-7;
            ASSERT_NEAR(a[i], b[i], k_activation_tol * (std::fabs(a[i]) + 1e-6) + cancel)
                << "n=" << n << " i=" << i << " gate=" << g[i];
        }
    }
}

TEST(kernels_cpu, gelu_tanh_is_torchs_tanh_approximation) {
    // torch.nn.functional.gelu(x, approximate="tanh") in F32 (torch 2.11, CPU), up = 1.
    const std::vector<float> x    = {-3.0f, -1.0f, -0.25f, 0.0f, 0.5f, 1.0f, 2.5f, 10.0f};
    const std::vector<float> want = {-0.00363743305f, -0.158807993f, -0.100324646f, 0.0f,
                                     0.345714003f,    0.841192007f,  2.48491573f,   10.0f};
    const std::vector<float> ones(x.size(), 1.0f);
    std::vector<float>       y(x.size()), y_ref(x.size());
    cpu::gelu_tanh_mul(x.data(), ones.data(), y.data(), static_cast<int64_t>(x.size()), nullptr);
    cpu::gelu_tanh_mul_ref(x.data(), ones.data(), y_ref.data(), static_cast<int64_t>(x.size()));
    for (size_t i = 0; i < x.size(); ++i) {
        // The F32 version evaluates torch's expression in torch's order: within an ulp or two.
        EXPECT_NEAR(y[i], want[i], 2.5e-7 * std::fabs(want[i])) << "x=" << x[i];
        // torch's F32 value itself carries the cancellation of 1 + tanh (0.5 |x| eps) that the
        // double reference does not.
        EXPECT_NEAR(y_ref[i], want[i], 2.5e-7 * std::fabs(want[i]) + 0.5 * std::fabs(x[i]) * 1.2e-7) << "x=" << x[i];
    }
}

TEST(kernels_cpu, softcap_matches_reference_and_caps) {
    std::mt19937 rng(9);
    for (float cap : {0.5f, 30.0f, 50.0f})
        for (int64_t n : {1, 9, 20000}) {
            auto x = random_vec(rng, n, 40.0f), a = x, b = x;
            cpu::softcap_ref(a.data(), n, cap);
            cpu::softcap(b.data(), n, cap, &pool3());
            for (int64_t i = 0; i < n; ++i) {
                ASSERT_NEAR(a[i], b[i], k_activation_tol * (std::fabs(a[i]) + 1e-6)) << "cap=" << cap;
                ASSERT_LE(std::fabs(b[i]), cap);
                ASSERT_EQ(b[i] > 0, x[i] > 0);  // odd and monotone: the sign stays
            }
        }
    float x = 15.0f;  // 30 tanh(0.5) = 13.8653...
    cpu::softcap(&x, 1, 30.0f, nullptr);
    EXPECT_NEAR(x, 30.0 * std::tanh(0.5), 4e-6);
}

TEST(kernels_cpu, attention_softcap_matches_reference) {
    std::mt19937 rng(10);
    int          n_cases = 0;
    for (float cap : {0.3f, 5.0f, 50.0f})
        for (int64_t window : {0, 3}) {
            cpu::attention_shape s;
            s.n_head    = 4;
            s.n_head_kv = 2;
            s.head_dim  = 8;
            s.window    = window;
            s.softcap   = cap;
            for (int64_t n : {1, 33, 70}) {
                s.n_q = s.n_kv = n;
                s.q_pos0       = 0;
                check_attention(rng, s);
                ++n_cases;
            }
            s.n_q    = 1;  // decode
            s.n_kv   = 45;
            s.q_pos0 = 44;
            check_attention(rng, s);
            ++n_cases;
        }
    EXPECT_EQ(n_cases, 24);
}

TEST(kernels_cpu, attention_softcap_is_the_formula) {
    // One head, head_dim 1, query 1 sees keys 0 and 1: weights softmax(cap tanh(scale q k_j / cap)).
    const float          cap = 2.0f, scale = 0.5f;
    cpu::attention_shape s;
    s.n_q = s.n_kv = 2;
    s.n_head = s.n_head_kv = 1;
    s.head_dim = s.q_stride = s.kv_stride = s.out_stride = 1;
    s.scale                                              = scale;
    s.softcap                                            = cap;
    const std::vector<float> q = {0, 6}, k = {1, -2}, v = {10, -4};
    const double             s0 = cap * std::tanh(scale * 6 * 1 / cap), s1 = cap * std::tanh(scale * 6 * -2 / cap);
    const double             w0 = 1 / (1 + std::exp(s1 - s0));
    for (bool ref : {true, false}) {
        std::vector<float> o(2);
        if (ref)
            cpu::attention_ref(q.data(), k.data(), v.data(), o.data(), s);
        else
            cpu::attention_blas(q.data(), k.data(), v.data(), o.data(), s, nullptr);
        EXPECT_EQ(o[0], 10.0f);
        EXPECT_NEAR(o[1], w0 * 10 + (1 - w0) * -4, 1e-5) << (ref ? "reference" : "blas");
    }
}
