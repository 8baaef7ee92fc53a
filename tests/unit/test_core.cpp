// core: F16/BF16 conversions (exhaustively against an independent oracle), status/result,
// tensor views, progress bar rendering, thread pool.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <limits>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"

using namespace gptq;

namespace {

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

// Oracle for f16 -> f32: the definition, with ldexp in double.
double f16_value(uint16_t h) {
    const int sign = (h >> 15) ? -1 : 1;
    const int exp  = (h >> 10) & 0x1f;
    const int man  = h & 0x3ff;
    if (exp == 0) return sign * std::ldexp(static_cast<double>(man), -24);
    if (exp == 31) return man ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
    return sign * std::ldexp(static_cast<double>(man + 1024), exp - 25);
}

// Oracle for f32 -> f16: pick the nearest of all finite f16 values by exhaustive search of the two
// neighbours in a sorted table, ties to the even code; beyond 65520 -> inf.
uint16_t f16_round_oracle(float f) {
    static std::vector<std::pair<double, uint16_t>> table = [] {
        std::vector<std::pair<double, uint16_t>> t;
        for (uint32_t h = 0; h < 0x7c00; ++h) t.emplace_back(f16_value(static_cast<uint16_t>(h)), h);
        return t;  // increasing in value for non-negative codes
    }();
    const double   a  = std::fabs(static_cast<double>(f));
    const uint16_t sg = std::signbit(f) ? 0x8000 : 0;
    if (a >= 65520.0) return sg | 0x7c00;
    auto it = std::lower_bound(table.begin(), table.end(), std::make_pair(a, uint16_t(0)));
    if (it == table.end()) return sg | 0x7bff;  // in (65504, 65520): nearest is the largest finite
    if (it->first == a) return sg | it->second;
    auto         lo  = it - 1;
    const double dlo = a - lo->first, dhi = it->first - a;
    if (dlo < dhi) return sg | lo->second;
    if (dhi < dlo) return sg | it->second;
    return sg | ((lo->second & 1) ? it->second : lo->second);
}

}  // namespace

TEST(dtype, f16_to_f32_all_codes_exact) {
    for (uint32_t h = 0; h <= 0xffff; ++h) {
        const float  f = f16_to_f32(static_cast<uint16_t>(h));
        const double v = f16_value(static_cast<uint16_t>(h));
        if (std::isnan(v)) {
            ASSERT_TRUE(std::isnan(f)) << h;
        } else {
            ASSERT_EQ(static_cast<double>(f), v) << "code " << h;
            ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << h;
        }
    }
}

TEST(dtype, f16_round_trip_all_codes) {
    for (uint32_t h = 0; h <= 0xffff; ++h) {
        const auto  code = static_cast<uint16_t>(h);
        const float f    = f16_to_f32(code);
        if (std::isnan(f)) {
            const uint16_t back = f32_to_f16(f);
            ASSERT_EQ(back & 0x7c00, 0x7c00);
            ASSERT_NE(back & 0x3ff, 0) << "NaN must stay NaN: " << h;
            ASSERT_EQ(back & 0x8000, code & 0x8000);
        } else {
            ASSERT_EQ(f32_to_f16(f), code) << h;
        }
    }
}

TEST(dtype, f32_to_f16_matches_oracle_on_ties_subnormals_and_random) {
    std::vector<float> cases = {0.0f,
                                -0.0f,
                                1.0f,
                                65504.0f,
                                65519.99f,
                                65520.0f,
                                1e10f,
                                -1e10f,
                                std::ldexp(1.0f, -24),
                                std::ldexp(1.0f, -25),
                                std::ldexp(1.5f, -25),
                                std::ldexp(1.0f, -26),
                                std::ldexp(3.0f, -25),
                                std::ldexp(1.0f, -14),
                                std::ldexp(1023.5f, -24),
                                std::numeric_limits<float>::denorm_min(),
                                INFINITY,
                                -INFINITY};
    // Exact midpoints between consecutive f16 values (ties) across the range.
    for (uint32_t h = 0; h < 0x7bff; h += 37) {
        const double a = f16_value(static_cast<uint16_t>(h)), b = f16_value(static_cast<uint16_t>(h + 1));
        cases.push_back(static_cast<float>((a + b) / 2));
        cases.push_back(-static_cast<float>((a + b) / 2));
    }
    std::mt19937                            rng(1234);
    std::uniform_int_distribution<uint32_t> any;
    for (int i = 0; i < 200000; ++i) {
        uint32_t u = any(rng);
        // Concentrate on the f16 exponent range (|x| in [2^-26, 2^17]).
        u = (u & 0x807fffffu) | (((u >> 23) % 43 + 101) << 23);
        float f;
        std::memcpy(&f, &u, 4);
        cases.push_back(f);
    }
    for (float f : cases) ASSERT_EQ(f32_to_f16(f), f16_round_oracle(f)) << "value " << f << " bits " << bits(f);
}

TEST(dtype, f32_to_f16_row_equals_the_scalar_conversion_bit_for_bit) {
    // The row conversion (F16C where the CPU has it) against f32_to_f16 per element, on every
    // class of input: random bit patterns (NaNs with payloads, Infs, subnormals, huge and tiny
    // values included), ties, the overflow edge; lengths that leave tails of every size.
    std::vector<float> cases = {65519.99f,
                                65520.0f,
                                -65520.0f,
                                std::ldexp(1.0f, -25),
                                std::ldexp(3.0f, -25),
                                std::numeric_limits<float>::denorm_min(),
                                INFINITY,
                                -INFINITY};
    for (uint32_t h = 0; h < 0x7bff; h += 37)
        cases.push_back(
            static_cast<float>((f16_value(static_cast<uint16_t>(h)) + f16_value(static_cast<uint16_t>(h + 1))) / 2));
    std::mt19937                            rng(99);
    std::uniform_int_distribution<uint32_t> any;
    for (int i = 0; i < 100000; ++i) {
        const uint32_t u = any(rng);
        float          f;
        std::memcpy(&f, &u, 4);
        cases.push_back(f);
    }
    for (size_t n : {cases.size(), size_t(1), size_t(7), size_t(9), size_t(15)}) {
        std::vector<uint16_t> row(n), scalar(n);
        f32_to_f16_row(cases.data(), row.data(), n);
        f32_to_f16_row_portable(cases.data(), scalar.data(), n);
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(row[i], scalar[i]) << "bits " << bits(cases[i]);
    }
}

TEST(dtype, bf16_conversions) {
    for (uint32_t b = 0; b <= 0xffff; ++b) {
        const float f = bf16_to_f32(static_cast<uint16_t>(b));
        ASSERT_EQ(bits(f), b << 16);
        if (std::isnan(f)) {
            ASSERT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
        } else {
            ASSERT_EQ(f32_to_bf16(f), b);
        }
    }
    // Ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even); 1 + 3*2^-8 -> 1 + 2^-6.
    EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
    EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
    EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
    EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // overflow -> inf
    EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
    // A signalling NaN whose payload sits only in the low bits must not become Inf.
    uint32_t snan = 0x7f800001u;
    float    f;
    std::memcpy(&f, &snan, 4);
    EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
}

TEST(dtype, names_round_trip) {
    for (int i = 0; i < static_cast<int>(dtype::DTYPE_COUNT); ++i) {
        const auto t = static_cast<dtype>(i);
        dtype      back;
        ASSERT_TRUE(dtype_from_name(dtype_name(t), &back));
        EXPECT_EQ(back, t);
    }
    dtype out;
    EXPECT_FALSE(dtype_from_name("F17", &out));
    EXPECT_FALSE(dtype_from_name("f32", &out));  // names are case-sensitive, as in safetensors
    EXPECT_EQ(dtype_size(dtype::DTYPE_BF16), 2u);
    EXPECT_EQ(dtype_size(dtype::DTYPE_I64), 8u);
}

static result<int> parse_positive(int v) {
    if (v <= 0) return make_error(status_code::STATUS_INVALID_ARGUMENT, "value {} is not positive", v);
    return v;
}
static status use_it(int v, int* out) {
    GPTQ_ASSIGN_OR_RETURN(*out, parse_positive(v));
    return status::ok();
}

TEST(status, result_and_macros) {
    auto ok = parse_positive(3);
    ASSERT_TRUE(ok.is_ok());
    EXPECT_EQ(*ok, 3);
    auto bad = parse_positive(-2);
    ASSERT_FALSE(bad.is_ok());
    EXPECT_EQ(bad.error().code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(bad.error().message(), "value -2 is not positive");
    int out = 0;
    EXPECT_TRUE(use_it(5, &out).is_ok());
    EXPECT_EQ(out, 5);
    status st = use_it(0, &out).with_context("file.json");
    EXPECT_EQ(st.message(), "file.json: value 0 is not positive");
    EXPECT_TRUE(status::ok().with_context("x").is_ok());
}

TEST(tensor, contiguous_views) {
    std::vector<float> data(24);
    auto               v = tensor_view::contiguous(data.data(), dtype::DTYPE_F32, {2, 3, 4});
    EXPECT_EQ(v.numel(), 24);
    EXPECT_EQ(v.nbytes(), 96u);
    EXPECT_EQ(v.strides[0], 12);
    EXPECT_EQ(v.strides[2], 1);
    EXPECT_TRUE(v.is_contiguous());
    EXPECT_EQ(v.shape_string(), "[2, 3, 4]");
    v.strides[0] = 13;
    EXPECT_FALSE(v.is_contiguous());
    auto scalar = tensor_view::contiguous(data.data(), dtype::DTYPE_F32, {});
    EXPECT_EQ(scalar.numel(), 1);
}

TEST(progress, render_reports_rate_and_eta) {
    progress_set_quiet(true);
    progress_bar bar("layers", 10, "layer");
    EXPECT_FALSE(bar.enabled());
    bar.set(5);
    const std::string line = bar.render(10.0);
    EXPECT_NE(line.find("5/10"), std::string::npos) << line;
    EXPECT_NE(line.find("0.5 layer/s"), std::string::npos) << line;
    EXPECT_NE(line.find("eta 00:10"), std::string::npos) << line;
    progress_set_quiet(false);
}

// The contention check's lost-time rule: a quiet VM's occasional preemptions (a few hundred us
// apart by tens of ms) never reach 10 % of a 100 ms window; an oversubscribed core's (milliseconds
// off the CPU, several per window) do, after which the window starts over.
TEST(thread_pool, contention_window_needs_lost_time_not_one_event) {
    constexpr int64_t ms = 1'000'000, us = 1'000;
    contention_window w;
    for (int64_t t = 0; t < 5000 * ms; t += 20 * ms) EXPECT_FALSE(w.add(t, 500 * us)) << t;  // 2.5 % lost
    contention_window busy;
    EXPECT_FALSE(busy.add(0, 4 * ms));
    EXPECT_FALSE(busy.add(5 * ms, 4 * ms));
    EXPECT_TRUE(busy.add(9 * ms, 3 * ms));  // 11 ms lost within 100 ms
    EXPECT_FALSE(busy.add(10 * ms, 4 * ms)) << "the window starts over";
    contention_window spread;  // the same 11 ms over more than a window: no
    EXPECT_FALSE(spread.add(0, 6 * ms));
    EXPECT_FALSE(spread.add(101 * ms, 5 * ms));
    EXPECT_FALSE(spread.add(150 * ms, 4 * ms));
    EXPECT_TRUE(spread.add(190 * ms, 1 * ms));  // 5 + 4 + 1 = 10 ms in the window from 101 ms
    contention_window negative;
    EXPECT_FALSE(negative.add(0, -50 * ms)) << "no credit for a clock that went back";
    EXPECT_TRUE(negative.add(1 * ms, 10 * ms));
}

TEST(thread_pool, parallel_for_covers_range_once) {
    for (int spin_us : {0, 100, 5000}) {  // sleeping at once, the default spin, a long spin
        thread_pool pool(3, spin_us);
        EXPECT_EQ(pool.spin_us(), spin_us);
        for (int round = 0; round < 200; ++round) {  // back to back: the workers catch jobs while spinning
            std::vector<std::atomic<int>> hits(17);
            pool.parallel_for(17, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
            });
            for (auto& h : hits) ASSERT_EQ(h.load(), 1) << "spin " << spin_us << " round " << round;
        }
    }
    thread_pool pool(4);
    EXPECT_EQ(pool.spin_us(), thread_pool::default_spin_us());
    for (int64_t n : {0, 1, 2, 3, 7, 100, 1001}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        pool.parallel_for(n, [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << n << " " << i;
    }
    // Nested use runs serially instead of deadlocking.
    std::atomic<int64_t> total{0};
    pool.parallel_for(8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) pool.parallel_for(10, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
    });
    EXPECT_EQ(total.load(), 80);
}

TEST(thread_pool, an_idle_pool_sleeps) {
    // After a job the workers spin for at most spin_us, then sleep: 300 ms of idleness cost the
    // process far less than 300 ms of CPU time per worker (a spinning worker would).
    thread_pool          pool(3, 1000);
    std::atomic<int64_t> total{0};
    pool.parallel_for(3, [&](int64_t b, int64_t e) { total += e - b; });
    EXPECT_EQ(total.load(), 3);
    auto cpu_ms = [] {
        timespec ts{};
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
    };
    const double c0 = cpu_ms();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_LT(cpu_ms() - c0, 50.0) << "CPU time of an idle pool over 300 ms";
}

TEST(thread_pool, exception_in_a_worker_reaches_the_caller_and_the_pool_stays_usable) {
    thread_pool pool(4);
    // Chunk 0 runs in the calling thread, the others in workers: throw from each in turn.
    for (int64_t bad = 0; bad < 8; ++bad) {
        std::atomic<int> done{0};
        try {
            pool.parallel_for(8, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) {
                    if (i == bad) throw std::bad_alloc();
                    done++;
                }
            });
            ADD_FAILURE() << "no exception for element " << bad;
        } catch (const std::bad_alloc&) {
        }
        EXPECT_LE(done.load(), 7);
    }
    std::atomic<int64_t> total{0};
    pool.parallel_for(1000, [&](int64_t b, int64_t e) { total += e - b; });
    EXPECT_EQ(total.load(), 1000);
}
