// gptq bench (include/gptq/bench.h): the measuring protocol over a model_session (model_session.h,
// CPU or GPU): per batch size, a warm-up iteration then `repeat` timed ones of prefill + gen decode
// steps with seeded random token ids; medians; peak memory per row; the FP16 original after the
// model. Every step returns when its logits are on the host (the GPU's stream is synchronised), so
// wall-clock time around a step is the step's time.
#include "gptq/bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/log.h"
#include "model_session.h"

namespace gptq {

namespace fs = std::filesystem;

namespace {
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

status check_params(const bench_params& p) {
    if (p.model_path.empty()) return make_error(E_ARG, "bench: no model given");
    GPTQ_ASSIGN_OR_RETURN(const device_spec dev, device_parse(p.device));
    if (p.batches.empty()) return make_error(E_ARG, "bench: --batch needs at least one batch size");
    if (dev.cuda)
        for (int64_t b : p.batches)
            if (b > k_cuda_session_max_seq)
                return make_error(status_code::STATUS_UNSUPPORTED,
                                  "bench: --batch {} on --device {}: the GPU model runs up to {} sequences", b,
                                  device_name(dev), k_cuda_session_max_seq);
    GPTQ_TRY(device_check(dev));
    for (int64_t b : p.batches)
        if (b < 1 || b > 4096) return make_error(E_ARG, "bench: --batch {}: expected 1 .. 4096", b);
    if (p.prompt < 1) return make_error(E_ARG, "bench: --prompt {}: expected >= 1 token", p.prompt);
    if (p.gen < 1) return make_error(E_ARG, "bench: --gen {}: expected >= 1 decode step", p.gen);
    if (p.repeat < 1) return make_error(E_ARG, "bench: --repeat {}: expected >= 1", p.repeat);
    if (p.n_threads < 0) return make_error(E_ARG, "bench: --threads {}: expected >= 0", p.n_threads);
    if (p.profile_ops && !dev.cuda)
        return make_error(E_ARG, "bench: --profile-ops times the ops of the GPU model; it needs --device cuda (got {})",
                          device_name(dev));
    return status::ok();
}

result<std::unique_ptr<model_session>> session_open(const bench_params& p, const std::string& path,
                                                    const std::vector<lora_spec>& loras) {
    model_session_options o;
    o.model_path = path;
    GPTQ_ASSIGN_OR_RETURN(o.device, device_parse(p.device));
    o.n_threads  = p.n_threads;
    o.n_ctx_hint = p.prompt + p.gen;  // the GPU: the KV cache and the planner's context
    o.device_map = p.device_map;
    o.max_memory = p.max_memory;
    o.loras      = loras;
    GPTQ_TRY(model_session_check(o));
    auto s = model_session_open(o);
    if (!s) return s.error().with_context(fmt::format("bench: {}", path));
    return s;
}

struct timing {
    double prefill = 0, decode = 0;
};

// One iteration: reserve, prefill batch x prompt (one step, a sequence per slot), gen decode steps.
result<timing> iterate(model_session& s, const bench_params& p, int64_t batch, std::mt19937_64& rng) {
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(s.n_vocab() - 1));
    std::vector<int32_t>                   ids(static_cast<size_t>(batch * p.prompt));
    for (auto& id : ids) id = tok(rng);
    std::vector<std::vector<int32_t>> gen_ids(static_cast<size_t>(p.gen),
                                              std::vector<int32_t>(static_cast<size_t>(batch)));
    for (auto& g : gen_ids)
        for (auto& id : g) id = tok(rng);
    std::vector<float>    logits(static_cast<size_t>(batch * s.n_vocab()));
    std::vector<seq_step> prefill(static_cast<size_t>(batch)), decode(static_cast<size_t>(batch));
    const int32_t         lora = s.lora_names().empty() ? -1 : 0;  // the adapters, stacked
    for (int64_t b = 0; b < batch; ++b)
        prefill[static_cast<size_t>(b)] = {
            .seq = b, .ids = ids.data() + b * p.prompt, .n_tokens = p.prompt, .lora = lora};
    GPTQ_TRY(s.reserve(batch, p.prompt + p.gen));
    timing t;
    auto   t0 = std::chrono::steady_clock::now();
    GPTQ_TRY(s.step(prefill, logits.data()));
    t.prefill = seconds_since(t0);
    t0        = std::chrono::steady_clock::now();
    for (const auto& g : gen_ids) {
        for (int64_t b = 0; b < batch; ++b)
            decode[static_cast<size_t>(b)] = {.seq = b, .ids = g.data() + b, .n_tokens = 1, .lora = lora};
        GPTQ_TRY(s.step(decode, logits.data()));
    }
    t.decode = seconds_since(t0);
    return t;
}

result<std::vector<bench_row>> bench_model(const bench_params& p, const std::string& path, const std::string& role) {
    const auto t_load = std::chrono::steady_clock::now();
    GPTQ_ASSIGN_OR_RETURN(std::unique_ptr<model_session> be,
                          session_open(p, path, role == "model" ? p.loras : std::vector<lora_spec>{}));
    const double           load_seconds = seconds_since(t_load);
    const std::string      machine      = be->describe();  // as opened (the GPU's KV cache before any row)
    std::vector<bench_row> rows;
    for (int64_t batch : p.batches) {
        bench_row r;
        r.model = fs::path(path).lexically_normal().filename().string();
        if (r.model.empty()) r.model = fs::path(path).lexically_normal().parent_path().filename().string();
        r.model_path   = path;
        r.role         = role;
        r.weights      = be->weights() + (be->lora_names().empty() ? "" : "+lora:" + be->lora_names()[0]);
        r.device       = be->device();
        r.machine      = machine;
        r.n_threads    = std::max(1, be->n_threads());  // a GPU: the one host thread driving it
        r.batch        = batch;
        r.prompt       = p.prompt;
        r.gen          = p.gen;
        r.repeat       = p.repeat;
        r.memory_kind  = be->memory_kind();
        r.load_seconds = load_seconds;
        // The same ids for a batch size whatever the model, so that the original sees what the model saw.
        std::mt19937_64 rng(p.seed * 1000003u + static_cast<uint64_t>(batch));
        GPTQ_TRY(be->reserve(0, 0));  // free the previous row's caches before the peak is reset
        be->memory_reset_peak();
        GPTQ_TRY(iterate(*be, p, batch, rng).to_status());  // warm-up, not counted
        std::vector<double> pre, dec;
        for (int i = 0; i < p.repeat; ++i) {
            GPTQ_ASSIGN_OR_RETURN(timing t, iterate(*be, p, batch, rng));
            pre.push_back(t.prefill);
            dec.push_back(t.decode);
        }
        r.prefill_tokens     = batch * p.prompt;
        r.decode_tokens      = batch * p.gen;
        r.prefill_seconds    = median(pre);
        r.decode_seconds     = median(dec);
        r.prefill_tok_per_s  = r.prefill_seconds > 0 ? static_cast<double>(r.prefill_tokens) / r.prefill_seconds : 0;
        r.decode_tok_per_s   = r.decode_seconds > 0 ? static_cast<double>(r.decode_tokens) / r.decode_seconds : 0;
        r.ttft_ms            = r.prefill_seconds * 1e3;
        r.decode_ms_per_step = r.decode_seconds * 1e3 / static_cast<double>(p.gen);
        r.peak_memory_bytes  = be->memory_used();
        if (p.profile_ops) {  // one more iteration, decode steps uncaptured with an event after each op
            GPTQ_TRY(be->profile_ops(true));
            auto t = iterate(*be, p, batch, rng);
            GPTQ_TRY(be->profile_ops(false));
            if (!t) return t.error();
            const gpu_op_profile prof = be->decode_profile();
            if (prof.passes > 0) {
                const double steps         = static_cast<double>(prof.passes);
                r.profile_steps            = prof.passes;
                r.profile_wall_ms_per_step = t->decode * 1e3 / steps;
                r.profile_gpu_us_per_step  = prof.pass_ms * 1e3 / steps;
                for (const auto& o : prof.ops)
                    r.op_profile.push_back({o.op, static_cast<double>(o.calls) / steps, o.ms * 1e3 / steps,
                                            prof.pass_ms > 0 ? o.ms / prof.pass_ms : 0.0});
            }
        }
        if (p.progress)
            GPTQ_LOG_INFO("bench {} ({}) batch {}: prefill {:.1f} tok/s, decode {:.2f} tok/s", r.model, role, batch,
                          r.prefill_tok_per_s, r.decode_tok_per_s);
        rows.push_back(r);
    }
    return rows;
}

std::string human_bytes(uint64_t n) {
    if (n >= (1ull << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(n) / (1ull << 30));
    return fmt::format("{:.1f} MiB", static_cast<double>(n) / (1ull << 20));
}
}  // namespace

result<bench_result> bench_run(const bench_params& params) {
    GPTQ_TRY(check_params(params));
    bench_result res;
    try {
        GPTQ_ASSIGN_OR_RETURN(res.rows, bench_model(params, params.model_path, "model"));
        if (!params.compare_fp16.empty()) {
            GPTQ_ASSIGN_OR_RETURN(auto orig, bench_model(params, params.compare_fp16, "fp16"));
            for (auto& r : res.rows)
                for (const auto& o : orig)
                    if (o.batch == r.batch) {
                        r.prefill_vs_fp16 = o.prefill_tok_per_s > 0 ? r.prefill_tok_per_s / o.prefill_tok_per_s : 0;
                        r.decode_vs_fp16  = o.decode_tok_per_s > 0 ? r.decode_tok_per_s / o.decode_tok_per_s : 0;
                    }
            res.rows.insert(res.rows.end(), orig.begin(), orig.end());
        }
    } catch (const std::bad_alloc&) {
        return make_error(
            status_code::STATUS_OUT_OF_MEMORY,
            "bench: out of host memory (model {}, batches up to {} x {} tokens); lower --batch or --prompt",
            params.model_path, *std::max_element(params.batches.begin(), params.batches.end()),
            params.prompt + params.gen);
    }
    return res;
}

std::string bench_result_text(const bench_result& res) {
    if (res.rows.empty()) return "no rows\n";
    const bench_row& f = res.rows.front();
    std::string      s =
        fmt::format("device {}, {}, {} threads; prompt {} + {} decode steps; median of {} after 1 warm-up\n", f.device,
                    f.machine, f.n_threads, f.prompt, f.gen, f.repeat);
    const bool cmp = std::any_of(res.rows.begin(), res.rows.end(), [](const bench_row& r) { return r.role == "fp16"; });
    s += fmt::format("{:<24} {:<6} {:<16} {:>5} {:>13} {:>12} {:>10} {:>9} {:>11}{}\n", "model", "role", "weights",
                     "batch", "prefill tok/s", "decode tok/s", "TTFT ms", "ms/step", "peak mem",
                     cmp ? "   vs fp16 (prefill, decode)" : "");
    for (const auto& r : res.rows) {
        s += fmt::format("{:<24} {:<6} {:<16} {:>5} {:>13.1f} {:>12.2f} {:>10.1f} {:>9.2f} {:>11}", r.model, r.role,
                         r.weights, r.batch, r.prefill_tok_per_s, r.decode_tok_per_s, r.ttft_ms, r.decode_ms_per_step,
                         human_bytes(r.peak_memory_bytes));
        if (cmp && r.role == "model") s += fmt::format("   {:.2f}x, {:.2f}x", r.prefill_vs_fp16, r.decode_vs_fp16);
        s += "\n";
    }
    for (const auto& r : res.rows) {
        if (r.op_profile.empty()) continue;
        s += fmt::format(
            "\nop profile, {} ({}) batch {}: {} decode steps run UNCAPTURED (no CUDA graph) with a CUDA event after "
            "each op;\n{:.3f} ms/step wall, {:.1f} us/step GPU from the first event to the last (the graph replays "
            "above: {:.3f} ms/step).\nAn op's time runs from the end of the op before to its own end, so it includes "
            "the GPU waiting for the host to launch it.\n",
            r.model, r.role, r.batch, r.profile_steps, r.profile_wall_ms_per_step, r.profile_gpu_us_per_step,
            r.decode_ms_per_step);
        s += fmt::format("{:<14} {:>10} {:>10} {:>7}\n", "op", "calls/step", "us/step", "share");
        for (const auto& o : r.op_profile)
            s += fmt::format("{:<14} {:>10.2f} {:>10.1f} {:>6.1f}%\n", o.op, o.calls_per_step, o.us_per_step,
                             100.0 * o.share);
    }
    return s;
}

std::string bench_row_json(const bench_row& r) {
    nlohmann::ordered_json j;
    j["model"]              = r.model;
    j["model_path"]         = r.model_path;
    j["role"]               = r.role;
    j["weights"]            = r.weights;
    j["device"]             = r.device;
    j["machine"]            = r.machine;
    j["threads"]            = r.n_threads;
    j["batch"]              = r.batch;
    j["prompt"]             = r.prompt;
    j["gen"]                = r.gen;
    j["repeat"]             = r.repeat;
    j["prefill_tokens"]     = r.prefill_tokens;
    j["decode_tokens"]      = r.decode_tokens;
    j["prefill_seconds"]    = r.prefill_seconds;
    j["decode_seconds"]     = r.decode_seconds;
    j["prefill_tok_per_s"]  = r.prefill_tok_per_s;
    j["decode_tok_per_s"]   = r.decode_tok_per_s;
    j["ttft_ms"]            = r.ttft_ms;
    j["decode_ms_per_step"] = r.decode_ms_per_step;
    j["peak_memory_bytes"]  = r.peak_memory_bytes;
    j["memory_kind"]        = r.memory_kind;
    j["load_seconds"]       = r.load_seconds;
    if (r.role == "model" && (r.prefill_vs_fp16 > 0 || r.decode_vs_fp16 > 0)) {
        j["prefill_vs_fp16"] = r.prefill_vs_fp16;
        j["decode_vs_fp16"]  = r.decode_vs_fp16;
    }
    if (!r.op_profile.empty()) {
        nlohmann::ordered_json p;
        p["mode"]                  = "uncaptured";  // decode steps without the CUDA graph, an event after each op
        p["steps"]                 = r.profile_steps;
        p["wall_ms_per_step"]      = r.profile_wall_ms_per_step;
        p["gpu_us_per_step"]       = r.profile_gpu_us_per_step;
        nlohmann::ordered_json ops = nlohmann::ordered_json::array();
        for (const auto& o : r.op_profile)
            ops.push_back({{"op", o.op},
                           {"calls_per_step", o.calls_per_step},
                           {"us_per_step", o.us_per_step},
                           {"share", o.share}});
        p["ops"]        = ops;
        j["op_profile"] = p;
    }
    return j.dump();
}

std::string bench_result_json(const bench_result& res) {
    std::string s;
    for (const auto& r : res.rows) s += bench_row_json(r) + "\n";
    return s;
}

}  // namespace gptq
