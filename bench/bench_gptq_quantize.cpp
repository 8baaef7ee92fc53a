// GPTQ quantization on the GPU (quant/gptq_cuda.h, experimental) at the Llama-2-7B linear shapes:
// q/k/v/o 4096 -> 4096, gate/up 4096 -> 11008, down 11008 -> 4096, 4-bit g128, with and without
// act-order. Per shape: the Hessian accumulation of `--tokens` F16 activations on the device
// (cuda_hessian_accumulator, fed in chunks of 8192 tokens), then gptq_quantize_cuda end to end as
// the quantizer calls it (host W and H in, host result out: uploads, host-side decisions, Cholesky,
// column loop, downloads). Wall-clock seconds, median of 3 after one warm-up. With --cpu, the CPU's
// gptq_quantize on the same layer (all cores; slow) for the speed-up and the code agreement.
// The last JSON line estimates a 7B model's GPTQ solve: 32 layers x (4 x attn + 2 x gate/up + down).
//
//   bench_gptq_quantize [--out FILE.json] [--tokens N] [--cpu] [--only attn|gate_up|down]
// JSON lines to FILE (or stdout), a table on stderr.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "ops/ops_cuda.h"
#include "quant/gptq.h"
#include "quant/gptq_cuda.h"

namespace {

using namespace gptq;
using clock_type = std::chrono::steady_clock;

constexpr int64_t k_chunk = 8192;  // tokens per Hessian update

struct xorshift {
    uint64_t s = 0x9E3779B97F4A7C15ull;
    uint32_t next() {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        return uint32_t(s >> 11);
    }
    float normal() {  // sum of 4 uniforms, centred and scaled: good enough for a benchmark
        float u = 0;
        for (int i = 0; i < 4; ++i) u += float(next() >> 8) / float(1u << 24);
        return (u - 2.0f) * 1.7320508f;
    }
};

double seconds_since(clock_type::time_point t0) {
    return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median3(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

bool ok(const status& st, const char* what) {
    if (st.is_ok()) return true;
    std::fprintf(stderr, "bench_gptq_quantize: %s: %s\n", what, st.message().c_str());
    return false;
}

}  // namespace

int main(int argc, char** argv) {
    std::string out_path, only;
    int64_t     tokens = 128 * 2048;  // the calibration set
    bool        cpu    = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--out" && i + 1 < argc)
            out_path = argv[++i];
        else if (a == "--tokens" && i + 1 < argc)
            tokens = std::max<int64_t>(k_chunk, std::atoll(argv[++i]));
        else if (a == "--only" && i + 1 < argc)
            only = argv[++i];
        else if (a == "--cpu")
            cpu = true;
        else {
            std::fprintf(stderr, "usage: bench_gptq_quantize [--out FILE.json] [--tokens N] [--cpu] [--only SHAPE]\n");
            return 2;
        }
    }
    FILE* out = out_path.empty() ? stdout : std::fopen(out_path.c_str(), "w");
    if (!out) return 1;
    auto ctx_r = cuda_context::create(0);
    if (!ctx_r) {
        std::fprintf(stderr, "bench_gptq_quantize: %s\n", ctx_r.error().message().c_str());
        return 1;
    }
    cuda_context&     cc = **ctx_r;
    thread_pool       pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    const ops_context ctx{&pool, false};

    struct shape {
        const char* name;
        int64_t     n_out, n_in;
        int         per_layer;
    };
    const shape shapes[]   = {{"attn", 4096, 4096, 4}, {"gate_up", 11008, 4096, 2}, {"down", 4096, 11008, 1}};
    double      layer_s[2] = {0, 0};  // per act-order setting: one layer's solve time
    std::fprintf(stderr, "%-8s %6s %6s %4s %10s %10s %10s %8s\n", "shape", "n_out", "n_in", "act", "hess_s", "gpu_s",
                 "cpu_s", "codes");
    for (const shape& s : shapes) {
        if (!only.empty() && only != s.name) continue;
        xorshift rng;
        // Activations with a few strong directions (as real ones): x = z + 3 z_0 on every 16th feature.
        std::vector<uint16_t> x(static_cast<size_t>(k_chunk * s.n_in));
        for (int64_t t = 0; t < k_chunk; ++t) {
            const float z0 = rng.normal();
            for (int64_t k = 0; k < s.n_in; ++k)
                x[size_t(t * s.n_in + k)] = f32_to_f16(rng.normal() + (k % 16 == 0 ? 3.0f * z0 : 0.0f));
        }
        std::vector<float> w(static_cast<size_t>(s.n_out * s.n_in));
        for (auto& v : w) v = 0.02f * rng.normal();

        auto xd = cuda_buffer::alloc(x.size() * 2);
        if (!xd || !ok(cuda_copy_to_device_async(cc, xd->data(), x.data(), x.size() * 2), "upload x")) return 1;
        std::vector<double> hs;
        std::vector<float>  h;
        for (int rep = 0; rep < 2; ++rep) {
            auto acc = cuda_hessian_accumulator::create(cc, s.n_in);
            if (!acc || !ok(cc.synchronize(), "sync")) return 1;
            const auto t0 = clock_type::now();
            for (int64_t done = 0; done < tokens; done += k_chunk)
                if (!ok(acc->add_f16(cc, xd->as<uint16_t>(), std::min(k_chunk, tokens - done)), "hessian")) return 1;
            auto hh = acc->finish_host(cc);  // waits for the device
            if (!hh) {
                ok(hh.error(), "hessian finish");
                return 1;
            }
            hs.push_back(seconds_since(t0));
            h = std::move(*hh);
        }
        const double hess_s = hs.back();

        for (int act = 0; act < 2; ++act) {
            gptq_options o;
            o.desc_act = act != 0;
            std::vector<double> ts;
            quantized_linear    qg;
            for (int rep = 0; rep < 4; ++rep) {
                const auto t0 = clock_type::now();
                auto       g  = gptq_quantize_cuda(cc, ctx, w.data(), s.n_out, s.n_in, h.data(), o);
                if (!g) {
                    ok(g.error(), "gptq_quantize_cuda");
                    return 1;
                }
                if (rep > 0) ts.push_back(seconds_since(t0));
                qg = std::move(*g);
            }
            const double gpu_s = median3(ts);
            double       cpu_s = -1, codes = -1;
            if (cpu) {
                const auto t0 = clock_type::now();
                auto       c  = gptq_quantize(ctx, w.data(), s.n_out, s.n_in, h.data(), o);
                if (!c) {
                    ok(c.error(), "gptq_quantize");
                    return 1;
                }
                cpu_s    = seconds_since(t0);
                size_t d = 0;
                for (size_t i = 0; i < c->codes.size(); ++i) d += c->codes[i] != qg.codes[i];
                codes = double(d) / double(c->codes.size());
            }
            layer_s[act] += s.per_layer * gpu_s;
            std::fprintf(out,
                         "{\"bench\":\"gptq_quantize\",\"shape\":\"%s\",\"n_out\":%ld,\"n_in\":%ld,\"bits\":4,\"group_"
                         "size\":128,\"act_order\":%s,"
                         "\"tokens\":%ld,\"hessian_s\":%.4f,\"gptq_gpu_s\":%.4f,\"gptq_cpu_s\":%.3f,"
                         "\"codes_differing_frac\":%.6f}\n",
                         s.name, long(s.n_out), long(s.n_in), act ? "true" : "false", long(tokens), hess_s, gpu_s,
                         cpu_s, codes);
            std::fprintf(stderr, "%-8s %6ld %6ld %4d %10.4f %10.4f %10.3f %8.5f\n", s.name, long(s.n_out), long(s.n_in),
                         act, hess_s, gpu_s, cpu_s, codes);
        }
    }
    if (only.empty())
        std::fprintf(out,
                     "{\"bench\":\"gptq_quantize\",\"estimate\":\"llama-2-7b gptq solve, 32 "
                     "layers\",\"seconds\":%.2f,\"seconds_act_order\":%.2f}\n",
                     32 * layer_s[0], 32 * layer_s[1]);
    if (out != stdout) std::fclose(out);
    return 0;
}
