// Kernel benchmark: the int4 GPTQ GEMV (ops_cuda, fast layout, g128) against cuBLAS FP16 in the
// same run, on the Llama-2-7B linear shapes (qkv 4096->12288, o 4096->4096, gate_up 4096->22016,
// down 11008->4096) at m = 1, 2, 4, 8, 16 tokens.
//
// Method (../shared/docs/anchors.md, H100 section): random weights (never zeros), several copies
// of each layer rotated so that L2 (50 MB) cannot hold them, launches pipelined on one stream
// between two events (and again as one CUDA graph of the same launches), 10 warm-up launches,
// 7 rounds of `iters` launches, the median round reported per launch. Bytes counted: weights +
// scales/zeros + activations in + outputs, each once. Roofline: 2.94 TB/s (measured copy rate).
//
//   bench_gptq_gemv [--out FILE.json] [--iters N] [--only SHAPE] [--m M]
// JSON to FILE (or stdout), a table on stderr; --only/--m restrict the sweep (for ncu).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/ops_cuda.h"

namespace {

using namespace gptq;

constexpr double k_roofline_bps = 2.94e12;       // H100 device-to-device copy, bytes read + written
constexpr size_t k_rotate_bytes = 256ull << 20;  // each layer's copies span at least this (L2: 50 MB)
constexpr int    k_rounds = 7, k_warmup = 10;

struct xorshift {
    uint64_t s = 0x9E3779B97F4A7C15ull;
    uint32_t next() {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        return uint32_t(s >> 11);
    }
    float uniform() { return float(next() >> 8) / float(1u << 24); }
};

uint16_t f16_bits(float f) {  // positive normal values only (scales, activations' magnitude)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const int      e    = int((u >> 23) & 0xff) - 127 + 15;
    if (e <= 0) return uint16_t(sign);
    return uint16_t(sign | (uint32_t(e) << 10) | ((u >> 13) & 0x3ffu));
}

bool check(const status& st, const char* what) {
    if (st.is_ok()) return true;
    std::fprintf(stderr, "bench_gptq_gemv: %s: %s\n", what, st.message().c_str());
    return false;
}

// Median time per launch (us) of `launch(i)` for i = 0..iters-1, on the context's stream;
// graph = true captures the iters launches once and replays the graph.
double time_us(cuda_context& ctx, int iters, bool graph, const std::function<status(int)>& launch) {
    cudaStream_t s = ctx.stream();
    for (int i = 0; i < k_warmup; ++i)
        if (!check(launch(i), "warm-up")) return -1;
    cudaGraphExec_t exec = nullptr;
    if (graph) {
        cudaGraph_t g = nullptr;
        if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return -1;
        bool ok = true;
        for (int i = 0; i < iters && ok; ++i) ok = launch(i).is_ok();
        if (cudaStreamEndCapture(s, &g) != cudaSuccess || !ok) {
            cudaGetLastError();
            return -1;
        }
        if (cudaGraphInstantiate(&exec, g, 0) != cudaSuccess) return -1;
        cudaGraphDestroy(g);
        cudaGraphLaunch(exec, s);  // warm the graph
    }
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<double> rounds;
    for (int r = 0; r < k_rounds; ++r) {
        cudaEventRecord(a, s);
        if (graph) {
            cudaGraphLaunch(exec, s);
        } else {
            for (int i = 0; i < iters; ++i) (void)launch(i);
        }
        cudaEventRecord(b, s);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        rounds.push_back(double(ms) * 1000.0 / iters);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    if (exec) cudaGraphExecDestroy(exec);
    if (cudaGetLastError() != cudaSuccess) return -1;
    std::sort(rounds.begin(), rounds.end());
    return rounds[rounds.size() / 2];
}

struct shape {
    const char* name;
    int64_t     n_in, n_out;
};

}  // namespace

int main(int argc, char** argv) {
    std::string out_path;
    int         iters = 100;
    std::string only;        // one shape (for the profiler)
    int64_t     only_m = 0;  // one m
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--out") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        } else if (!std::strcmp(argv[i], "--m") && i + 1 < argc) {
            only_m = std::atoi(argv[++i]);
        } else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = std::max(1, std::atoi(argv[++i]));
        } else {
            std::fprintf(stderr, "usage: bench_gptq_gemv [--out FILE.json] [--iters N] [--only SHAPE] [--m M]\n");
            return 2;
        }
    }
    auto ctxr = cuda_context::create(0);
    if (!ctxr) {
        std::fprintf(stderr, "bench_gptq_gemv: %s\n", ctxr.error().message().c_str());
        return 1;
    }
    cuda_context&  ctx = **ctxr;
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);

    const std::vector<shape> shapes = {
        {"qkv", 4096, 12288}, {"o", 4096, 4096}, {"gate_up", 4096, 22016}, {"down", 11008, 4096}};
    const std::vector<int64_t> ms = {1, 2, 4, 8, 16};
    const int64_t              gs = 128;
    xorshift                   rng;
    std::string                json = "{\"device\": \"" + std::string(prop.name) + "\", \"roofline_tbps\": 2.94, " +
                       "\"group_size\": 128, \"iters\": " + std::to_string(iters) + ", \"results\": [\n";
    bool first = true;
    std::fprintf(stderr, "%-8s %3s %9s %9s %9s %9s %9s %8s %8s %8s\n", "shape", "m", "fp16_us", "fp16_grph", "int4_us",
                 "int4_nosp", "int4_grph", "act_us", "speedup", "roof%");

    for (const shape& sh : shapes) {
        if (!only.empty() && only != sh.name) continue;
        const int64_t K = sh.n_in, N = sh.n_out, G = K / gs;
        // Host tensors (random codes, zeros, scales in [0.001, 0.021)), g_idx trivial and act-order.
        std::vector<int32_t>  qweight(static_cast<size_t>(K / 8 * N)), qzeros(static_cast<size_t>(G * N / 8));
        std::vector<int32_t>  g_idx(static_cast<size_t>(K)), g_act(static_cast<size_t>(K));
        std::vector<uint16_t> scales(size_t(G * N));
        for (auto& v : qweight) v = int32_t(rng.next());
        for (auto& v : qzeros) v = int32_t(rng.next());
        for (auto& v : scales) v = f16_bits(0.001f + 0.02f * rng.uniform());
        std::vector<int32_t> order(static_cast<size_t>(K));
        for (int64_t k = 0; k < K; ++k) order[size_t(k)] = int32_t(k), g_idx[size_t(k)] = int32_t(k / gs);
        for (int64_t k = K - 1; k > 0; --k) std::swap(order[size_t(k)], order[rng.next() % uint32_t(k + 1)]);
        for (int64_t i = 0; i < K; ++i) g_act[size_t(order[size_t(i)])] = int32_t(i / gs);
        gptq_host_tensors t;
        t.qweight = qweight.data(), t.qzeros = qzeros.data(), t.scales = scales.data(), t.g_idx = g_idx.data();
        t.n_out = N, t.n_in = K, t.n_groups = G, t.bits = 4, t.group_size = gs;

        const size_t int4_bytes = size_t(K * N / 2 + ((N + 31) / 32) * G * 128);
        const size_t fp16_bytes = size_t(K * N * 2);
        const int    r_int4     = int(std::clamp<size_t>((k_rotate_bytes + int4_bytes - 1) / int4_bytes, 2, 64));
        const int    r_fp16     = int(std::clamp<size_t>((k_rotate_bytes + fp16_bytes - 1) / fp16_bytes, 2, 64));
        std::vector<cuda_gptq_linear> q4, q4act;
        for (int r = 0; r < r_int4; ++r) {
            auto l = cuda_gptq_linear_load(ctx, t);
            if (!l || !l->fast) {
                std::fprintf(stderr, "bench_gptq_gemv: int4 load failed or not fast\n");
                return 1;
            }
            q4.push_back(std::move(*l));
        }
        t.g_idx = g_act.data();
        for (int r = 0; r < r_int4; ++r) {
            auto l = cuda_gptq_linear_load(ctx, t);
            if (!l || !l->fast || !l->perm.bytes()) return 1;
            q4act.push_back(std::move(*l));
        }
        std::vector<cuda_buffer> w16;
        {
            std::vector<uint16_t> w(size_t(K * N));
            for (auto& v : w) v = f16_bits((rng.uniform() - 0.5f) * 0.05f) | uint16_t((rng.next() & 1) << 15);
            for (int r = 0; r < r_fp16; ++r) {
                auto b = cuda_buffer::from_host(w.data(), w.size() * 2);
                if (!b) return 1;
                w16.push_back(std::move(*b));
            }
        }
        std::vector<uint16_t> xh(size_t(16 * K));
        for (auto& v : xh) v = f16_bits(rng.uniform() + 0.01f) | uint16_t((rng.next() & 1) << 15);
        auto x = cuda_buffer::from_host(xh.data(), xh.size() * 2);
        auto y = cuda_buffer::alloc(size_t(16 * N) * 2);
        if (!x || !y) return 1;
        const uint16_t* xp = x->as<uint16_t>();
        uint16_t*       yp = y->as<uint16_t>();
        if (!check(ctx.scratch(size_t(16 * K) * 2).to_status(), "scratch")) return 1;

        for (int64_t m : ms) {
            if (only_m && m != only_m) continue;
            auto fp16 = [&](int i) {
                return op_cuda_linear_dense(ctx, xp, w16[size_t(i) % w16.size()].as<uint16_t>(), yp, m, N, K);
            };
            auto int4 = [&](int i) { return op_cuda_gptq_linear(ctx, q4[size_t(i) % q4.size()], xp, yp, m); };
            auto act  = [&](int i) { return op_cuda_gptq_linear(ctx, q4act[size_t(i) % q4act.size()], xp, yp, m); };
            const double t16 = time_us(ctx, iters, false, fp16);
            for (auto& l : q4) l.unroll = 8;
            const double t4 = time_us(ctx, iters, false, int4);
            for (auto& l : q4) l.splits = 1;
            const double t4s1 = time_us(ctx, iters, false, int4);
            for (auto& l : q4) l.splits = 0;
            const double t4g  = time_us(ctx, iters, true, int4);
            const double t16g = time_us(ctx, iters, true, fp16);
            const double tact = time_us(ctx, iters, false, act);
            const double best = std::min({t4 > 0 ? t4 : 1e30, t4s1 > 0 ? t4s1 : 1e30});
            const size_t io   = size_t(m * K * 2 + m * N * 2);
            const double gbs  = double(int4_bytes + io) / (best * 1e-6) / 1e9;
            const double roof = double(int4_bytes + io) / k_roofline_bps / (best * 1e-6);
            std::fprintf(stderr, "%-8s %3lld %9.1f %9.1f %9.1f %9.1f %9.1f %8.1f %7.2fx %7.1f%%\n", sh.name,
                         (long long)m, t16, t16g, t4, t4s1, t4g, tact, t16 / best, 100 * roof);
            char buf[1024];
            std::snprintf(buf, sizeof buf,
                          "%s  {\"shape\": \"%s\", \"n_in\": %lld, \"n_out\": %lld, \"m\": %lld, "
                          "\"fp16_us\": %.2f, \"fp16_graph_us\": %.2f, \"fp16_gbs\": %.1f, "
                          "\"int4_us\": %.2f, \"int4_nosplit_us\": %.2f, \"int4_graph_us\": %.2f, "
                          "\"int4_act_order_us\": %.2f, \"int4_bytes\": %zu, \"int4_gbs\": %.1f, "
                          "\"speedup_vs_fp16\": %.3f, \"roofline_fraction\": %.3f, \"copies_int4\": %d, "
                          "\"copies_fp16\": %d}",
                          first ? "" : ",\n", sh.name, (long long)K, (long long)N, (long long)m, t16, t16g,
                          double(fp16_bytes + io) / (t16 * 1e-6) / 1e9, t4, t4s1, t4g, tact, int4_bytes + io, gbs,
                          t16 / best, roof, r_int4, r_fp16);
            json += buf;
            first = false;
        }
    }
    json += "\n]}\n";
    if (out_path.empty()) {
        std::fputs(json.c_str(), stdout);
    } else {
        FILE* f = std::fopen(out_path.c_str(), "w");
        if (!f) return 1;
        std::fputs(json.c_str(), f);
        std::fclose(f);
    }
    return 0;
}
