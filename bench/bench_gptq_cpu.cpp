// CPU linear kernels at prompt and decode sizes (issue 22): the GPTQ int8-activation path
// (gptq_linear, GEMV for m < 4 and the int8 GEMM for prompts; the best kernel and AVX2's), its F32
// path, and the F16 linear
// (linear_f16), on random layers of small-llama's and a Llama-2-7B layer's shapes, one thread.
// The machine is shared, so each case reports the MINIMUM time of `reps` calls (plus the median),
// the least disturbed run: compare binaries by it, interleaved.
//   bench_gptq_cpu [reps=15] [m ...]     (default m: 1 512)
// Output: one JSON line per (kernel, shape, m): us per call, GFLOP/s (2 m n k / time).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/gptq_linear.h"
#include "kernels/cpu/linear.h"
#include "ops/gptq_linear.h"

using namespace gptq;

namespace {
struct shape {
    const char* name;
    int64_t     n_out, n_in;
};

template <typename F>
void time_it(const char* kernel, const shape& s, int64_t m, int reps, F&& f) {
    f();  // warm-up: scratch buffers, page faults
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
        const auto a = std::chrono::steady_clock::now();
        f();
        t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
    }
    std::sort(t.begin(), t.end());
    const double flop = 2.0 * static_cast<double>(m * s.n_out * s.n_in);
    std::printf(
        "{\"kernel\":\"%s\",\"shape\":\"%s\",\"n_out\":%lld,\"n_in\":%lld,\"m\":%lld,\"us_min\":%.1f,"
        "\"us_median\":%.1f,\"gflops_at_min\":%.1f}\n",
        kernel, s.name, static_cast<long long>(s.n_out), static_cast<long long>(s.n_in), static_cast<long long>(m),
        t.front(), t[t.size() / 2], flop / t.front() / 1e3);
    std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) {
    const int            reps = argc > 1 ? std::atoi(argv[1]) : 15;
    std::vector<int64_t> ms;
    for (int i = 2; i < argc; ++i) ms.push_back(std::atoll(argv[i]));
    if (ms.empty()) ms = {1, 512};
    cpu::blas_init_single_threaded();
    std::mt19937                    rng(1);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    for (const shape& s : {shape{"small gate", 1536, 512}, shape{"small down", 512, 1536}, shape{"small q", 512, 512},
                           shape{"7b o", 4096, 4096}}) {
        const int64_t        gs = 128, ng = s.n_in / gs;
        std::vector<uint8_t> codes(static_cast<size_t>(s.n_out * s.n_in));
        for (auto& c : codes) c = static_cast<uint8_t>(rng() % 16);
        std::vector<float> scales(static_cast<size_t>(ng * s.n_out));
        for (auto& v : scales) v = 0.001f + 0.01f * static_cast<float>(rng() % 100) / 100.0f;
        std::vector<int32_t> zeros(scales.size(), 8), g_idx(static_cast<size_t>(s.n_in));
        for (int64_t k = 0; k < s.n_in; ++k) g_idx[size_t(k)] = static_cast<int32_t>(k / gs);
        const auto p = gptq_packed_linear::from_unpacked(codes.data(), scales.data(), zeros.data(), g_idx.data(),
                                                         s.n_out, s.n_in, ng, 4);
        const cpu::gptq_cpu_layout l = p.layout();
        std::vector<float>         wf(static_cast<size_t>(s.n_out * s.n_in));
        for (auto& v : wf) v = nd(rng);
        std::vector<uint16_t> w16(wf.size());
        f32_to_f16_row(wf.data(), w16.data(), wf.size());
        for (int64_t m : ms) {
            std::vector<float> x(static_cast<size_t>(m * s.n_in)), y(static_cast<size_t>(m * s.n_out));
            for (auto& v : x) v = nd(rng) * 50.0f;
            time_it("gptq int8", s, m, reps,
                    [&] { cpu::gptq_linear(x.data(), l, nullptr, y.data(), m, nullptr, true); });
            if (m == 1) {  // codes out of cache: copies of the layer in turn (256 MB)
                const size_t                    n_cp = std::max<size_t>(2, (256u << 20) / p.bytes());
                std::vector<gptq_packed_linear> cp(n_cp, p);
                size_t                          t = 0;
                time_it("gptq int8 cold", s, m, reps, [&] {
                    const cpu::gptq_cpu_layout lc = cp[t++ % n_cp].layout();
                    cpu::gptq_linear(x.data(), lc, nullptr, y.data(), m, nullptr, true);
                });
            }
            if (cpu::gptq_isa_available(cpu::gptq_isa::GPTQ_ISA_AVX2))  // the kernels of CPUs without VNNI
                time_it("gptq int8 avx2", s, m, reps, [&] {
                    cpu::gptq_linear(x.data(), l, nullptr, y.data(), m, nullptr, true, cpu::gptq_isa::GPTQ_ISA_AVX2);
                });
            if (m > 1)
                time_it("gptq f32", s, m, reps,
                        [&] { cpu::gptq_linear(x.data(), l, nullptr, y.data(), m, nullptr, false); });
            time_it("f16", s, m, reps,
                    [&] { cpu::linear_f16(x.data(), w16.data(), nullptr, y.data(), m, s.n_out, s.n_in, nullptr); });
            if (m == 1) {  // weights out of cache, as in a decode step of a model larger than L3: copies in turn
                const size_t                       bytes = w16.size() * 2;
                const size_t                       n_cp  = std::max<size_t>(2, (256u << 20) / bytes);
                std::vector<std::vector<uint16_t>> cp(n_cp, w16);
                size_t                             t = 0;
                time_it("f16 cold", s, m, reps, [&] {
                    cpu::linear_f16(x.data(), cp[t++ % n_cp].data(), nullptr, y.data(), m, s.n_out, s.n_in, nullptr);
                });
            }
        }
    }
    return 0;
}
