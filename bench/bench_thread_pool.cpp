// Wake-up latency of core/thread_pool: the wall time of parallel_for over a trivial job (every
// thread touches its own counter), the per-call overhead a decode step pays about 60 times (one
// call per linear, attention, norm...). Run: build-cpu/bin/bench_thread_pool [threads] [calls] [spin_us]
// Prints the median and range over 5 batches of `calls` calls, back to back and with a 20 us gap
// of work between calls (the gap between a decode step's ops), for a pool that sleeps at once
// (spin 0) and one that spins spin_us (default: thread_pool::default_spin_us()) before sleeping.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/thread_pool.h"

namespace {
double us_per_call(gptq::thread_pool& pool, int calls, int gap_us) {
    std::vector<std::atomic<int64_t>> hits(64);
    const auto                        t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) {
        pool.parallel_for(pool.n_threads(), [&](int64_t b, int64_t e) {
            for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
        });
        const auto g0 = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - g0 < std::chrono::microseconds(gap_us)) {
        }
    }
    const double total = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    return total / calls - gap_us;
}
}  // namespace

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
    const int calls   = argc > 2 ? std::atoi(argv[2]) : 2000;
    const int spin    = argc > 3 ? std::atoi(argv[3]) : gptq::thread_pool::default_spin_us();
    // The pool without spinning and with it, in turn (rounds interleaved: the machine's load moves).
    gptq::thread_pool sleeper(threads, 0), spinner(threads, spin);
    for (int gap : {0, 20}) {
        std::vector<double> r0, r1;
        for (int i = 0; i < 5; ++i) {
            r0.push_back(us_per_call(sleeper, calls, gap));
            r1.push_back(us_per_call(spinner, calls, gap));
        }
        std::sort(r0.begin(), r0.end());
        std::sort(r1.begin(), r1.end());
        std::printf(
            "threads %d, gap %2d us: spin 0: %.2f us per parallel_for (median of 5 x %d calls; %.2f-%.2f), "
            "spin %d us: %.2f (%.2f-%.2f)\n",
            threads, gap, r0[2], calls, r0[0], r0[4], spin, r1[2], r1[0], r1[4]);
    }
    return 0;
}
