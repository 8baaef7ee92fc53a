// Kernel benchmark: the int4 GPTQ linear (ops_cuda, fast layout, g128) against cuBLAS FP16 in the
// same run, on real layer shapes at m = 1 ... 2048 tokens. m <= 16: the decode GEMV; m > 16: the
// prefill paths (op dispatch, the fused int4 GEMM, dequantize + cuBLAS, the GEMV in 16-token
// chunks). Llama-2-7B by default (qkv fused 4096->12288, o 4096->4096, gate_up fused 4096->22016,
// down 11008->4096); --models 7b,13b,70b adds Llama-2-13B (5120: qkv ->15360, o, gate_up ->27648,
// down 13824->5120) and Llama-2-70B (8192, GQA 8 kv heads of 128: qkv ->10240, o, gate_up ->57344,
// down 28672->8192).
//
// Method (../shared/docs/anchors.md, H100 section): random weights (never zeros), several copies
// of each layer rotated so that L2 (50 MB) cannot hold them, launches pipelined on one stream
// between two events (m <= 16 also as one CUDA graph of the same launches), warm-up launches, 7
// rounds of N launches (N from a 3 ms round, at most --iters), the median round reported per
// launch. Bytes counted: int4 weights + scales/zeros + activations in + outputs, each once (the
// same bytes for every int4 path, so "GB/s" of dequantize + cuBLAS is an effective rate).
// Roofline: 2.94 TB/s (measured copy rate). TFLOP/s: 2 m n k / time.
//
//   bench_gptq_gemv [--out FILE.json] [--iters N] [--only SHAPE] [--m M[,M...]] [--models 7b,13b,70b]
//                   [--sweep] [--tile T --splits S]
// JSON to FILE (or stdout), a table on stderr; --only/--m restrict the sweep (for ncu); --sweep adds,
// for 16 < m <= 256, every fused tile x k split (the evidence for the dispatch table), with the best
// of each kernel family (mma.sync, wgmma, warp-streamed) per shape ("best" lines) and summed over
// a model's shapes ("summed" lines); --tile/--splits
// force the "fused" column's plan (int4_gemm_tile values; for ncu on one tile).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ops/ops_cuda.h"

namespace {

using namespace gptq;

constexpr double k_roofline_bps = 2.94e12;       // H100 device-to-device copy, bytes read + written
constexpr size_t k_rotate_bytes = 256ull << 20;  // each layer's copies span at least this (L2: 50 MB)
constexpr int    k_rounds = 7, k_warmup = 5;
constexpr double k_round_us = 3000.0;  // launches per round: about this much GPU time

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

// Median time per launch (us) of `launch(i)`, i = 0, 1, ..., on the context's stream. The launches
// per round come from a first estimate (a round of ~3 ms, at most max_iters); graph = true
// captures one round's launches once and replays the graph. -1 on failure.
double time_us(cuda_context& ctx, int max_iters, bool graph, const std::function<status(int)>& launch) {
    cudaStream_t s = ctx.stream();
    cudaEvent_t  a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    double result = -1;
    for (int i = 0; i < k_warmup; ++i)
        if (!check(launch(i), "warm-up")) goto done;
    {
        cudaEventRecord(a, s);
        for (int i = 0; i < 3; ++i) (void)launch(i);
        cudaEventRecord(b, s);
        cudaEventSynchronize(b);
        float est_ms = 0;
        cudaEventElapsedTime(&est_ms, a, b);
        const int       iters = std::clamp(int(k_round_us / std::max(1.0, double(est_ms) * 1000.0 / 3)), 3, max_iters);
        cudaGraphExec_t exec  = nullptr;
        if (graph) {
            cudaGraph_t g = nullptr;
            if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) goto done;
            bool ok = true;
            for (int i = 0; i < iters && ok; ++i) ok = launch(i).is_ok();
            if (cudaStreamEndCapture(s, &g) != cudaSuccess || !ok) {
                cudaGetLastError();
                goto done;
            }
            if (cudaGraphInstantiate(&exec, g, 0) != cudaSuccess) goto done;
            cudaGraphDestroy(g);
            cudaGraphLaunch(exec, s);  // warm the graph
        }
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
        if (exec) cudaGraphExecDestroy(exec);
        if (cudaGetLastError() != cudaSuccess) goto done;
        std::sort(rounds.begin(), rounds.end());
        result = rounds[rounds.size() / 2];
    }
done:
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return result;
}

struct shape {
    const char* model;
    const char* name;
    int64_t     n_in, n_out;
};

const std::vector<shape> k_shapes = {
    {"7b", "qkv", 4096, 12288},      {"7b", "o", 4096, 4096},         {"7b", "gate_up", 4096, 22016},
    {"7b", "down", 11008, 4096},     {"13b", "qkv", 5120, 15360},     {"13b", "o", 5120, 5120},
    {"13b", "gate_up", 5120, 27648}, {"13b", "down", 13824, 5120},    {"70b", "qkv", 8192, 10240},
    {"70b", "o", 8192, 8192},        {"70b", "gate_up", 8192, 57344}, {"70b", "down", 28672, 8192},
};

std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream        ss(s);
    std::string              item;
    while (std::getline(ss, item, ',')) out.push_back(item);
    return out;
}

// Kernel families of the fused GEMM's tiles (by name: "wg_" wgmma, "ws_" warp-streamed, else mma.sync).
constexpr int     k_families                 = 3;
const char* const k_family_names[k_families] = {"mma", "wgmma", "ws"};
int               family_of(const char* tile) {
                  if (!std::strncmp(tile, "wg_", 3)) return 1;
    if (!std::strncmp(tile, "ws_", 3)) return 2;
    return 0;
}
struct family_best {
    double      us     = -1;
    const char* tile   = "";
    int         splits = 0;
};
struct family_sum {
    double cublas = 0, best[k_families] = {0, 0, 0};
    int    shapes[k_families] = {0, 0, 0}, shapes_all = 0;
};

const char* path_name(gptq_prefill_path p) {
    switch (p) {
        case gptq_prefill_path::GPTQ_PREFILL_AUTO:
            return "auto";
        case gptq_prefill_path::GPTQ_PREFILL_FUSED:
            return "fused";
        case gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS:
            return "dequant_cublas";
        case gptq_prefill_path::GPTQ_PREFILL_GEMV:
            return "gemv";
    }
    return "?";
}

}  // namespace

int main(int argc, char** argv) {
    std::string              out_path;
    int                      iters = 100;
    std::string              only;  // one shape (for the profiler)
    std::vector<int64_t>     ms         = {1, 2, 4, 8, 16, 32, 64, 128, 256, 2048};
    std::vector<std::string> models     = {"7b"};
    bool                     sweep      = false;
    int                      force_tile = 0, force_splits = 0;  // the "fused" column's plan (0: the table's)
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--out") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        } else if (!std::strcmp(argv[i], "--m") && i + 1 < argc) {
            ms.clear();
            for (const auto& v : split_list(argv[++i])) ms.push_back(std::atoll(v.c_str()));
        } else if (!std::strcmp(argv[i], "--models") && i + 1 < argc) {
            models = split_list(argv[++i]);
        } else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = std::max(1, std::atoi(argv[++i]));
        } else if (!std::strcmp(argv[i], "--sweep")) {
            sweep = true;
        } else if (!std::strcmp(argv[i], "--tile") && i + 1 < argc) {
            force_tile = std::atoi(argv[++i]);
        } else if (!std::strcmp(argv[i], "--splits") && i + 1 < argc) {
            force_splits = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr,
                         "usage: bench_gptq_gemv [--out FILE.json] [--iters N] [--only SHAPE] [--m M[,M...]] "
                         "[--models 7b,13b,70b] [--sweep] [--tile T --splits S]\n");
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
    const int64_t m_max = *std::max_element(ms.begin(), ms.end());

    const int64_t gs = 128;
    xorshift      rng;
    std::string   json = "{\"device\": \"" + std::string(prop.name) +
                       "\", \"sm_count\": " + std::to_string(prop.multiProcessorCount) + ", \"roofline_tbps\": 2.94, " +
                       "\"group_size\": 128, \"max_iters\": " + std::to_string(iters) + ", \"results\": [\n";
    std::string                                           sweep_json;
    std::map<std::pair<std::string, int64_t>, family_sum> sums;  // sweep: (model, m) -> shapes summed
    bool                                                  first = true, first_sweep = true;
    std::fprintf(stderr, "%-4s %-8s %5s %9s %9s %-14s %8s %8s %8s %8s %8s %8s %7s %7s %7s\n", "mdl", "shape", "m",
                 "fp16_us", "int4_us", "path", "fused", "deq_cub", "gemv", "graph", "act_us", "GB/s", "TF/s", "fp16TF",
                 "ratio");

    for (const shape& sh : k_shapes) {
        if (std::find(models.begin(), models.end(), std::string(sh.model)) == models.end()) continue;
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
        std::vector<uint16_t> xh(size_t(m_max * K));
        for (auto& v : xh) v = f16_bits(rng.uniform() + 0.01f) | uint16_t((rng.next() & 1) << 15);
        auto x = cuda_buffer::from_host(xh.data(), xh.size() * 2);
        auto y = cuda_buffer::alloc(size_t(m_max * N) * 2);
        if (!x || !y) return 1;
        const uint16_t* xp = x->as<uint16_t>();
        uint16_t*       yp = y->as<uint16_t>();
        // Size the scratch once (permuted x + a dequantized layer) so no launch reallocates it.
        if (!check(ctx.scratch(size_t(m_max * K) * 2 + 256 + size_t(N * K) * 2).to_status(), "scratch")) return 1;

        for (int64_t m : ms) {
            auto fp16 = [&](int i) {
                return op_cuda_linear_dense(ctx, xp, w16[size_t(i) % w16.size()].as<uint16_t>(), yp, m, N, K);
            };
            auto with = [&](gptq_prefill_path p, int tile = 0, int splits = 0) {
                for (auto& l : q4) l.prefill = p, l.gemm_tile = tile, l.gemm_splits = splits;
            };
            auto int4 = [&](int i) { return op_cuda_gptq_linear(ctx, q4[size_t(i) % q4.size()], xp, yp, m); };
            auto act  = [&](int i) { return op_cuda_gptq_linear(ctx, q4act[size_t(i) % q4act.size()], xp, yp, m); };
            const double t16 = time_us(ctx, iters, false, fp16);
            with(gptq_prefill_path::GPTQ_PREFILL_AUTO);
            const double t4        = time_us(ctx, iters, false, int4);
            const double tact      = time_us(ctx, iters, false, act);
            const auto   auto_path = m <= 16 ? gptq_prefill_path::GPTQ_PREFILL_GEMV : gptq_prefill_path_for(m, N, K);
            double       t4g = -1, t16g = -1, tfused = -1, tdeq = -1, tgemv = -1, t4s1 = -1;
            const auto   plan = gptq_gemm_plan_describe(m, K);
            if (m <= 16) {
                for (auto& l : q4) l.splits = 1;
                t4s1 = time_us(ctx, iters, false, int4);
                for (auto& l : q4) l.splits = 0;
                t4g  = time_us(ctx, iters, true, int4);
                t16g = time_us(ctx, iters, true, fp16);
            } else {
                with(gptq_prefill_path::GPTQ_PREFILL_FUSED, force_tile, force_splits);
                tfused = time_us(ctx, iters, false, int4);
                with(gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS);
                tdeq = time_us(ctx, iters, false, int4);
                if (m <= 256) {
                    with(gptq_prefill_path::GPTQ_PREFILL_GEMV);
                    tgemv = time_us(ctx, iters, false, int4);
                }
                if (sweep && m <= 256) {
                    family_best best[k_families];
                    for (int tl = 1; tl < gptq_gemm_tile_count(); ++tl)
                        for (int sp : {1, 2, 3, 4, 6, 8}) {
                            if (!gptq_gemm_tile_usable(tl)) continue;
                            with(gptq_prefill_path::GPTQ_PREFILL_FUSED, tl, sp);
                            const double tt = time_us(ctx, iters, false, int4);
                            const char*  tn = gptq_gemm_plan_describe(m, K, tl, sp).tile;
                            family_best& fb = best[family_of(tn)];
                            if (tt > 0 && (fb.us < 0 || tt < fb.us)) fb = {tt, tn, sp};
                            char buf[512];
                            std::snprintf(buf, sizeof buf,
                                          "%s  {\"model\": \"%s\", \"shape\": \"%s\", \"m\": %lld, \"tile\": \"%s\", "
                                          "\"splits\": %d, \"us\": %.2f, \"ratio_vs_fp16\": %.3f}",
                                          first_sweep ? "" : ",\n", sh.model, sh.name, (long long)m,
                                          gptq_gemm_plan_describe(m, K, tl, sp).tile, sp, tt, tt > 0 ? t16 / tt : 0.0);
                            sweep_json += buf;
                            first_sweep = false;
                            std::fprintf(stderr, "  sweep %-4s %-8s m=%-5lld %-10s splits=%d %9.1f us  %5.2fx\n",
                                         sh.model, sh.name, (long long)m, gptq_gemm_plan_describe(m, K, tl, sp).tile,
                                         sp, tt, tt > 0 ? t16 / tt : 0.0);
                        }
                    // The best tile x split of each kernel family beside cuBLAS, and into the model's sums.
                    std::fprintf(stderr, "  best  %-4s %-8s m=%-5lld cublas %7.1f", sh.model, sh.name, (long long)m,
                                 t16);
                    family_sum& fs = sums[{std::string(sh.model), m}];
                    fs.cublas += t16;
                    for (int f = 0; f < k_families; ++f) {
                        if (best[f].us < 0) continue;
                        std::fprintf(stderr, " | %s %7.1f (%.2fx, %s x%d)", k_family_names[f], best[f].us,
                                     t16 / best[f].us, best[f].tile, best[f].splits);
                        fs.best[f] += best[f].us;
                        fs.shapes[f] += 1;
                    }
                    fs.shapes_all += 1;
                    std::fprintf(stderr, "\n");
                }
                with(gptq_prefill_path::GPTQ_PREFILL_AUTO);
            }
            const double best = (m <= 16 && t4s1 > 0) ? std::min(t4, t4s1) : t4;
            const size_t io   = size_t(m * K * 2 + m * N * 2);
            const double flop = 2.0 * double(m) * double(N) * double(K);
            const double gbs  = double(int4_bytes + io) / (t4 * 1e-6) / 1e9;
            const double tf = flop / (t4 * 1e-6) / 1e12, tf16 = flop / (t16 * 1e-6) / 1e12;
            const double roof = double(int4_bytes + io) / k_roofline_bps / (best * 1e-6);
            std::fprintf(stderr,
                         "%-4s %-8s %5lld %9.1f %9.1f %-14s %8.1f %8.1f %8.1f %8.1f %8.1f %8.0f %7.1f %7.1f %6.2fx\n",
                         sh.model, sh.name, (long long)m, t16, t4, path_name(auto_path), tfused, tdeq, tgemv, t4g, tact,
                         gbs, tf, tf16, t16 / t4);
            char buf[2048];
            std::snprintf(
                buf, sizeof buf,
                "%s  {\"model\": \"%s\", \"shape\": \"%s\", \"n_in\": %lld, \"n_out\": %lld, \"m\": %lld, "
                "\"fp16_us\": %.2f, \"fp16_graph_us\": %.2f, \"fp16_gbs\": %.1f, \"fp16_tflops\": %.2f, "
                "\"int4_us\": %.2f, \"int4_path\": \"%s\", \"int4_nosplit_us\": %.2f, \"int4_graph_us\": %.2f, "
                "\"fused_us\": %.2f, \"fused_tile\": \"%s\", \"fused_splits\": %d, \"dequant_cublas_us\": %.2f, "
                "\"gemv_chunks_us\": %.2f, \"int4_act_order_us\": %.2f, \"int4_bytes\": %zu, \"int4_gbs\": %.1f, "
                "\"int4_tflops\": %.2f, \"speedup_vs_fp16\": %.3f, \"roofline_fraction\": %.3f, \"copies_int4\": %d, "
                "\"copies_fp16\": %d}",
                first ? "" : ",\n", sh.model, sh.name, (long long)K, (long long)N, (long long)m, t16, t16g,
                double(fp16_bytes + io) / (t16 * 1e-6) / 1e9, tf16, t4, path_name(auto_path), t4s1, t4g, tfused,
                m > 16 ? plan.tile : "-", m > 16 ? plan.splits : 0, tdeq, tgemv, tact, int4_bytes + io, gbs, tf,
                t16 / t4, roof, r_int4, r_fp16);
            json += buf;
            first = false;
        }
    }
    // Shapes summed per model and m: cuBLAS FP16 and each family's best tile x split per shape.
    for (const auto& [key, fs] : sums) {
        std::fprintf(stderr, "  summed %-4s m=%-5lld cublas %8.1f", key.first.c_str(), (long long)key.second,
                     fs.cublas);
        for (int f = 0; f < k_families; ++f)
            if (fs.shapes[f] == fs.shapes_all && fs.best[f] > 0)
                std::fprintf(stderr, " | %s %8.1f (%.2fx)", k_family_names[f], fs.best[f], fs.cublas / fs.best[f]);
        std::fprintf(stderr, "\n");
    }
    json += "\n], \"sweep\": [\n" + sweep_json + "\n]}\n";
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
