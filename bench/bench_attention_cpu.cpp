// Decode attention on the CPU (issue 22): one query row over n_kv cached positions, the F32 cache
// (attention_blas: two sgemvs per head) against the F16 cache (attention_f16: F16C in registers)
// on each instruction set this CPU runs, single-threaded (no pool). Shapes: small-llama (8 heads,
// 4 key/value heads of 64) and a Llama-2-7B layer (32 heads of 128). Bytes counted: K and V of the
// visible positions once. Run: build-cpu/bin/bench_attention_cpu [n_kv ...] (default 128 512 1024 4096)
// Prints the median of 7 rounds per configuration (each round >= 20 ms of calls), in us per call.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/attention.h"

namespace {
using namespace gptq;

double median_us(const std::function<void()>& f) {
    std::vector<double> r;
    for (int round = 0; round < 7; ++round) {
        int        calls = 0;
        const auto t0    = std::chrono::steady_clock::now();
        double     us    = 0;
        do {
            f();
            ++calls;
            us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        } while (us < 20000);
        r.push_back(us / calls);
    }
    std::sort(r.begin(), r.end());
    return r[3];
}

void run(const char* name, int64_t n_head, int64_t n_head_kv, int64_t hd, int64_t n_kv) {
    cpu::attention_shape s;
    s.n_q = 1, s.n_kv = n_kv, s.q_pos0 = n_kv - 1;
    s.n_head = n_head, s.n_head_kv = n_head_kv, s.head_dim = hd;
    s.scale    = 1.0f / std::sqrt(static_cast<float>(hd));
    s.q_stride = s.out_stride = n_head * hd;
    s.kv_stride               = n_head_kv * hd;
    std::mt19937                    rng(1);
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float>              q(n_head * hd), k(n_kv * s.kv_stride), v(k.size()), out(q.size());
    for (auto* x : {&q, &k, &v})
        for (float& e : *x) e = d(rng);
    std::vector<uint16_t> k16(k.size()), v16(v.size());
    f32_to_f16_row(k.data(), k16.data(), k.size());
    f32_to_f16_row(v.data(), v16.data(), v.size());
    const double mb  = 2.0 * n_kv * s.kv_stride;  // elements of K and V
    const double t32 = median_us([&] { cpu::attention_blas(q.data(), k.data(), v.data(), out.data(), s, nullptr); });
    std::printf("%-12s n_kv %5lld  F32 sgemv      %8.1f us  %6.1f GB/s\n", name, (long long)n_kv, t32,
                mb * 4 / t32 / 1e3);
    for (cpu::f16_isa isa : {cpu::f16_isa::AVX512, cpu::f16_isa::AVX2, cpu::f16_isa::PORTABLE}) {
        if (!cpu::f16_isa_supported(isa)) continue;
        const double t16 =
            median_us([&] { cpu::attention_f16(q.data(), k16.data(), v16.data(), out.data(), s, nullptr, isa); });
        std::printf("%-12s n_kv %5lld  F16 %-10s %8.1f us  %6.1f GB/s  (%.2fx F32)\n", name, (long long)n_kv,
                    cpu::f16_isa_name(isa), t16, mb * 2 / t16 / 1e3, t32 / t16);
    }
}
}  // namespace

int main(int argc, char** argv) {
    std::vector<int64_t> sizes;
    for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
    if (sizes.empty()) sizes = {128, 512, 1024, 4096};
    for (int64_t n : sizes) run("small-llama", 8, 4, 64, n);
    for (int64_t n : sizes) run("llama-2-7b", 32, 32, 128, n);
    return 0;
}
