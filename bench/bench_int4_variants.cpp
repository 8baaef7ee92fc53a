// Kernel-variant sweep of the int4 GPTQ GEMV (kernels/cuda/gptq_int4): every variant of
// int4_gemv_f16 (int4_gemv_variant_name) and the automatic choice, on the Llama-2-7B linear shapes
// (qkv 4096->12288, o 4096->4096, gate_up 4096->22016, down 11008->4096) at m = 1..16, g128, to
// fill the per-shape table (auto_variant in gptq_int4.cu). bench_gptq_gemv is the benchmark of
// record (the path the model takes, against cuBLAS FP16); this one calls the kernel API directly.
//
// Method as bench_gptq_gemv (../shared/docs/anchors.md): random codes/zeros/scales, copies of the
// layer rotated so that they span 256 MB (L2: 50 MB), 10 warm-up launches, 7 rounds of `iters`
// launches pipelined on one stream (and again as one CUDA graph), the median round per launch.
// Bytes: weights + scales/zeros + activations + outputs; roofline 2.94 TB/s. Each variant's output
// is compared with variant 0's on the same input (a sanity check; the tests are the correctness
// check): the largest difference relative to the largest output is printed.
//
// Built with GPTQ_BUILD_BENCH (bin/bench_int4_variants); scripts/device/int4_variants.sh runs it.
//   bench_int4_variants [--out FILE.jsonl] [--iters N] [--only SHAPE] [--m M] [--variant V]
// (V: -1 auto, or an index; several --m / --variant flags allowed)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/gptq_int4.cuh"

namespace {

using namespace gptq;

constexpr double k_roofline_bps = 2.94e12;
constexpr size_t k_rotate_bytes = 256ull << 20;
constexpr int    k_rounds = 7, k_warmup = 10;

#define CK(x)                                                                                       \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) {                                                                    \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            std::exit(1);                                                                           \
        }                                                                                           \
    } while (0)

struct xorshift {
    uint64_t s = 0x9E3779B97F4A7C15ull;
    uint32_t next() {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        return uint32_t(s >> 11);
    }
    float uniform() { return float(next() >> 8) / float(1u << 24); }
};

uint16_t f16_bits(float f) {  // normal values only
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const int      e    = int((u >> 23) & 0xff) - 127 + 15;
    if (e <= 0) return uint16_t(sign);
    return uint16_t(sign | (uint32_t(e) << 10) | ((u >> 13) & 0x3ffu));
}

float f16_value(uint16_t h) {
    const int e = (h >> 10) & 0x1f, man = h & 0x3ff;
    float     v = e == 0 ? std::ldexp(float(man), -24) : std::ldexp(float(man | 0x400), e - 25);
    if (e == 31) v = man ? NAN : INFINITY;
    return (h & 0x8000) ? -v : v;
}

// Median time per launch (us); graph: the iters launches captured once and replayed.
double time_us(cudaStream_t s, int iters, bool graph, const std::function<bool(int)>& launch) {
    for (int i = 0; i < k_warmup; ++i)
        if (!launch(i)) return -1;
    cudaGraphExec_t exec = nullptr;
    if (graph) {
        cudaGraph_t g = nullptr;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        bool ok = true;
        for (int i = 0; i < iters && ok; ++i) ok = launch(i);
        CK(cudaStreamEndCapture(s, &g));
        if (!ok) return -1;
        CK(cudaGraphInstantiate(&exec, g, 0));
        CK(cudaGraphDestroy(g));
        CK(cudaGraphLaunch(exec, s));
    }
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<double> rounds;
    for (int r = 0; r < k_rounds; ++r) {
        CK(cudaEventRecord(a, s));
        if (graph) {
            CK(cudaGraphLaunch(exec, s));
        } else {
            for (int i = 0; i < iters; ++i) launch(i);
        }
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        rounds.push_back(double(ms) * 1000.0 / iters);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    if (exec) CK(cudaGraphExecDestroy(exec));
    CK(cudaGetLastError());
    std::sort(rounds.begin(), rounds.end());
    return rounds[rounds.size() / 2];
}

struct shape {
    const char* name;
    int64_t     n_in, n_out;
};

}  // namespace

int main(int argc, char** argv) {
    std::string          out_path, only;
    int                  iters = 100;
    std::vector<int64_t> ms;
    std::vector<int>     variants;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--out") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        } else if (!std::strcmp(argv[i], "--m") && i + 1 < argc) {
            ms.push_back(std::atoi(argv[++i]));
        } else if (!std::strcmp(argv[i], "--variant") && i + 1 < argc) {
            variants.push_back(std::atoi(argv[++i]));
        } else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = std::max(1, std::atoi(argv[++i]));
        } else {
            std::fprintf(stderr,
                         "usage: bench_int4_variants [--out FILE.jsonl] [--iters N] [--only SHAPE] [--m M]... "
                         "[--variant V]...\n");
            return 2;
        }
    }
    if (ms.empty()) ms = {1, 2, 4, 8, 9, 12, 16};
    if (variants.empty()) {
        variants.push_back(-1);
        for (int v = 0; v < cuda::int4_gemv_variant_count(); ++v) variants.push_back(v);
    }
    cudaDeviceProp prop{};
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    FILE* out = out_path.empty() ? nullptr : std::fopen(out_path.c_str(), "w");

    const std::vector<shape> shapes = {
        {"qkv", 4096, 12288}, {"o", 4096, 4096}, {"gate_up", 4096, 22016}, {"down", 11008, 4096}};
    const int64_t gs = 128;
    xorshift      rng;
    std::printf("device %s, %d SMs\n%-8s %3s %-16s %9s %9s %8s %7s %9s\n", prop.name, prop.multiProcessorCount, "shape",
                "m", "variant", "stream_us", "graph_us", "roof%", "GB/s", "rel_diff");
    for (const shape& sh : shapes) {
        if (!only.empty() && only != sh.name) continue;
        const int64_t K = sh.n_in, N = sh.n_out, G = K / gs;
        auto          lay = cuda::int4_layout_for(N, K, gs);
        if (!lay) return 1;
        std::vector<int32_t>  qweight(size_t(K / 8 * N)), qzeros(size_t(G * N / 8));
        std::vector<uint16_t> scales(size_t(G * N));
        for (auto& v : qweight) v = int32_t(rng.next());
        for (auto& v : qzeros) v = int32_t(rng.next());
        for (auto& v : scales) v = f16_bits(0.001f + 0.02f * rng.uniform());
        int32_t * dq = nullptr, *dz = nullptr;
        uint16_t* ds = nullptr;
        CK(cudaMalloc(&dq, qweight.size() * 4));
        CK(cudaMalloc(&dz, qzeros.size() * 4));
        CK(cudaMalloc(&ds, scales.size() * 2));
        CK(cudaMemcpy(dq, qweight.data(), qweight.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dz, qzeros.data(), qzeros.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(ds, scales.data(), scales.size() * 2, cudaMemcpyHostToDevice));
        const size_t       layer_bytes = size_t(lay->weight_bytes + lay->sz_bytes);
        const int          copies = int(std::clamp<size_t>((k_rotate_bytes + layer_bytes - 1) / layer_bytes, 2, 64));
        std::vector<void*> wc(static_cast<size_t>(copies)), sc(static_cast<size_t>(copies));
        for (int c = 0; c < copies; ++c) {
            CK(cudaMalloc(&wc[size_t(c)], size_t(lay->weight_bytes)));
            CK(cudaMalloc(&sc[size_t(c)], size_t(lay->sz_bytes)));
            if (c == 0) {
                const status st = cuda::int4_repack(*lay, dq, dz, ds, nullptr, 0, wc[0], sc[0], stream);
                if (!st.is_ok()) {
                    std::fprintf(stderr, "repack: %s\n", st.message().c_str());
                    return 1;
                }
                CK(cudaStreamSynchronize(stream));
            } else {
                CK(cudaMemcpy(wc[size_t(c)], wc[0], size_t(lay->weight_bytes), cudaMemcpyDeviceToDevice));
                CK(cudaMemcpy(sc[size_t(c)], sc[0], size_t(lay->sz_bytes), cudaMemcpyDeviceToDevice));
            }
        }
        CK(cudaFree(dq));
        CK(cudaFree(dz));
        CK(cudaFree(ds));
        std::vector<uint16_t> xh(size_t(16 * K));
        for (auto& v : xh) v = f16_bits(rng.uniform() + 0.01f) | uint16_t((rng.next() & 1) << 15);
        uint16_t *x = nullptr, *y = nullptr;
        CK(cudaMalloc(&x, xh.size() * 2));
        CK(cudaMalloc(&y, size_t(16 * N) * 2));
        CK(cudaMemcpy(x, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice));
        std::vector<uint16_t> ref(size_t(16 * N)), got(size_t(16 * N));

        for (int64_t m : ms) {
            bool have_ref = false;
            for (int v : variants) {
                auto launch = [&](int i) {
                    const status st = cuda::int4_gemv_f16(*lay, wc[size_t(i % copies)], sc[size_t(i % copies)], x,
                                                          nullptr, y, m, K, N, nullptr, 0, stream, 0, 0, v);
                    if (!st.is_ok()) std::fprintf(stderr, "variant %d: %s\n", v, st.message().c_str());
                    return st.is_ok();
                };
                const std::string name =
                    v < 0 ? std::string("auto=") + cuda::int4_gemv_variant_name(cuda::int4_gemv_auto_variant(*lay, m))
                          : cuda::int4_gemv_variant_name(v);
                // Sanity output of copy 0 against variant 0's.
                CK(cudaMemset(y, 0xFF, size_t(16 * N) * 2));
                if (!launch(0)) continue;
                CK(cudaStreamSynchronize(stream));
                CK(cudaMemcpy(got.data(), y, size_t(m * N) * 2, cudaMemcpyDeviceToHost));
                double rel = -1;
                if (v == 0) ref = got, have_ref = true;
                if (have_ref) {
                    double md = 0, mx = 0;
                    for (size_t i = 0; i < size_t(m * N); ++i) {
                        const double a = f16_value(ref[i]), b = f16_value(got[i]);
                        md = std::max(md, std::isfinite(b) ? std::fabs(a - b) : INFINITY);
                        mx = std::max(mx, std::fabs(a));
                    }
                    rel = md / std::max(mx, 1e-30);
                }
                const double ts   = time_us(stream, iters, false, launch);
                const double tg   = time_us(stream, iters, true, launch);
                const double best = std::min(ts > 0 ? ts : 1e30, tg > 0 ? tg : 1e30);
                const double io   = double(layer_bytes) + double(m * K * 2 + m * N * 2);
                const double roof = io / k_roofline_bps / (ts * 1e-6);
                std::printf("%-8s %3lld %-16s %9.2f %9.2f %7.1f%% %7.0f %9.2e\n", sh.name, (long long)m, name.c_str(),
                            ts, tg, 100 * roof, io / (best * 1e-6) / 1e9, rel);
                std::fflush(stdout);
                if (out)
                    std::fprintf(out,
                                 "{\"device\": \"%s\", \"shape\": \"%s\", \"n_in\": %lld, \"n_out\": %lld, \"m\": "
                                 "%lld, \"variant\": %d, \"name\": \"%s\", \"stream_us\": %.3f, \"graph_us\": %.3f, "
                                 "\"bytes\": %.0f, \"roofline_fraction_stream\": %.4f, \"rel_diff_vs_v0\": %.3e, "
                                 "\"copies\": %d}\n",
                                 prop.name, sh.name, (long long)K, (long long)N, (long long)m, v, name.c_str(), ts, tg,
                                 io, roof, rel, copies);
            }
        }
        for (int c = 0; c < copies; ++c) {
            CK(cudaFree(wc[size_t(c)]));
            CK(cudaFree(sc[size_t(c)]));
        }
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    if (out) std::fclose(out);
    return 0;
}
