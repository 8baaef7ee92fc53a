// gptq ppl: resolve the dataset, tokenize once, run model/perplexity over the windows on a
// model_session (model_session.h: the same loop for every device), time it.
#include "gptq/ppl.h"

#include <fmt/format.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "context_limit.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "data_files.h"
#include "model/llama.h"
#include "model/perplexity.h"
#include "model_session.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

namespace fs = std::filesystem;

namespace {
constexpr const char* k_wikitext2_rel = "data/wikitext2/wiki.test.raw.gptq_join.txt";

// "wikitext2": the bundled file (data_files.h says where it is looked for). Anything else: a
// path, read as is.
result<std::string> dataset_resolve(const std::string& dataset) {
    if (dataset != "wikitext2") {
        if (!fs::is_regular_file(dataset))
            return make_error(status_code::STATUS_NOT_FOUND, "dataset '{}': no such file (use 'wikitext2' or a path)",
                              dataset);
        return dataset;
    }
    auto p = bundled_data_resolve(k_wikitext2_rel);
    if (!p) return p.error().with_context("dataset 'wikitext2' (pass --dataset PATH to the joined text)");
    return p;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

namespace {
result<ppl_result> ppl_run_unguarded(const ppl_params& params);
}  // namespace

// Out of host memory beyond the plan checked below: an error naming the model, not a crash.
result<ppl_result> ppl_run(const ppl_params& params) {
    try {
        return ppl_run_unguarded(params);
    } catch (const std::bad_alloc&) {
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of host memory while evaluating {} (an allocation failed beyond the memory check); "
                          "lower --seqlen or free memory",
                          params.model_path);
    }
}

namespace {
// The host memory ppl's own work needs beside the weights: one window's activations (logits,
// hidden states, MLP, attention scores per head), checked by the CPU session at open.
uint64_t window_activation_bytes(const llama_hparams& hp, int64_t seqlen) {
    const auto sl = static_cast<uint64_t>(seqlen);
    return 4 * sl *
           static_cast<uint64_t>(hp.n_vocab + 6 * hp.n_embd + 3 * hp.n_ff + hp.q_dim() + 2 * hp.kv_dim() +
                                 hp.n_head * seqlen);
}

result<ppl_result> ppl_run_unguarded(const ppl_params& params) {
    if (params.seqlen < 2)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--seqlen is {}, expected at least 2", params.seqlen);
    if (params.max_windows < 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--max-windows is {}, expected >= 0",
                          params.max_windows);
    model_session_options so;
    so.model_path = params.model_path;
    GPTQ_ASSIGN_OR_RETURN(so.device, device_parse(params.device));
    so.n_threads      = params.n_threads;
    so.strict         = params.strict;
    so.n_ctx_hint     = params.seqlen;
    so.device_map     = params.device_map;
    so.max_memory     = params.max_memory;
    so.host_work_hint = "lower --seqlen or use a machine with more memory";
    GPTQ_TRY(model_session_check(so));
    const auto t_load = std::chrono::steady_clock::now();
    ppl_result r;
    GPTQ_ASSIGN_OR_RETURN(r.dataset_path, dataset_resolve(params.dataset));
    GPTQ_ASSIGN_OR_RETURN(std::string text, text_file_read(r.dataset_path));
    {
        // The config alone (no tensor read) for the checks before the weights are loaded.
        GPTQ_ASSIGN_OR_RETURN(const model_config cfg, model_config_load(params.model_path));
        GPTQ_ASSIGN_OR_RETURN(const llama_hparams hp, llama_hparams_from_config(cfg));
        // Windows past the trained positions (issue 15): an error for every device, not a silent figure.
        if (const int64_t ctx = model_context_limit(hp); ctx > 0 && params.seqlen > ctx)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "--seqlen {} is longer than the model's context of {} positions (max_position_embeddings "
                              "in {}); use --seqlen {} or less",
                              params.seqlen, ctx, cfg.path, ctx);
        so.host_work_bytes = window_activation_bytes(hp, params.seqlen);
    }
    GPTQ_ASSIGN_OR_RETURN(auto tok, tokenizer::load(params.model_path));
    const std::vector<int32_t> ids = tok->encode(text, /*add_special=*/true);
    r.n_dataset_tokens             = static_cast<int64_t>(ids.size());
    so.loras                       = params.loras;
    GPTQ_ASSIGN_OR_RETURN(auto session, model_session_open(so));
    r.load_seconds = seconds_since(t_load);
    if (!session->lora_names().empty()) r.lora = session->lora_names()[0];

    // The log-softmax of each window runs on the host (F32 in, F64 sums): on the CPU with the
    // forward pass's thread count, beside the GPU on a few threads.
    thread_pool       pool(session->n_threads() > 0 ? session->n_threads() : 2);
    const ops_context ctx{&pool, false};
    int64_t           n_windows = r.n_dataset_tokens / params.seqlen;
    if (params.max_windows > 0) n_windows = std::min(n_windows, params.max_windows);
    std::optional<progress_bar> bar;  // none when the caller asked for no progress output
    if (params.progress) bar.emplace("ppl", n_windows, "win");
    const int32_t        lora = session->lora_names().empty() ? -1 : 0;  // the adapters, stacked
    const window_forward fwd  = [&](const int32_t* win, int64_t n, float* logits) {
        return session->evaluate(win, n, logits, lora);
    };
    const auto t_eval = std::chrono::steady_clock::now();
    auto sums = perplexity_evaluate(fwd, session->n_vocab(), ctx, ids, params.seqlen, params.max_windows, [&](int64_t) {
        if (bar) bar->update(1);
    });
    if (bar) bar->finish();
    if (!sums.is_ok()) return sums.error().with_context(params.model_path);
    r.seconds           = seconds_since(t_eval);
    r.ppl               = sums->ppl();
    r.nll_mean          = sums->nll_sum / static_cast<double>(sums->n_predicted);
    r.n_windows         = sums->n_windows;
    r.seqlen            = params.seqlen;
    r.n_tokens          = r.n_windows * params.seqlen;
    r.n_predicted       = sums->n_predicted;
    r.n_threads         = session->n_threads();
    r.device            = session->device();
    r.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.n_tokens) / r.seconds : 0.0;
    if (so.device.cuda) {  // the GPU's own memory figures (the CPU's is the process's RSS)
        r.device_bytes  = session->memory_used();
        r.offload_bytes = session->offload_bytes();
    }
    return r;
}
}  // namespace

std::string ppl_result_text(const ppl_result& r) {
    return fmt::format(
        "ppl {:.4f}  (mean NLL {:.5f} over {} predicted tokens){}\n"
        "{} windows of {} tokens = {} tokens of {} in {}\n"
        "{:.2f} s, {:.1f} tokens/s on {} (load and tokenize {:.2f} s)\n",
        r.ppl, r.nll_mean, r.n_predicted, r.lora.empty() ? "" : ", LoRA " + r.lora, r.n_windows, r.seqlen, r.n_tokens,
        r.n_dataset_tokens, r.dataset_path, r.seconds, r.tokens_per_second,
        r.device == "cpu" ? fmt::format("{} threads", r.n_threads)
        : r.offload_bytes ? fmt::format("{} ({:.1f} MiB of GPU memory, {:.1f} MiB of weights offloaded to host memory)",
                                        r.device, r.device_bytes / 1048576.0, r.offload_bytes / 1048576.0)
                          : fmt::format("{} ({:.1f} MiB of GPU memory)", r.device, r.device_bytes / 1048576.0),
        r.load_seconds);
}

std::string ppl_result_json(const ppl_result& r) {
    nlohmann::ordered_json j;
    j["ppl"]               = r.ppl;
    j["nll_mean"]          = r.nll_mean;
    j["n_tokens"]          = r.n_tokens;
    j["n_predicted"]       = r.n_predicted;
    j["n_dataset_tokens"]  = r.n_dataset_tokens;
    j["n_windows"]         = r.n_windows;
    j["seqlen"]            = r.seqlen;
    j["n_threads"]         = r.n_threads;
    j["seconds"]           = r.seconds;
    j["tokens_per_second"] = r.tokens_per_second;
    if (!r.lora.empty()) j["lora"] = r.lora;
    j["load_seconds"]  = r.load_seconds;
    j["dataset"]       = r.dataset_path;
    j["device"]        = r.device;
    j["device_bytes"]  = r.device_bytes;
    j["offload_bytes"] = r.offload_bytes;
    return j.dump();
}

}  // namespace gptq
