// gptq bench MODEL [--device cpu|cuda[:N]] [--device-map auto|FILE] [--max-memory SPEC] [--batch 1,4,16] [--prompt 512]
// [--gen 128] [--compare-fp16 ORIGINAL] [--profile-ops]
//                  [--repeat 3] [--threads N] [--seed S] [--json] [--lora DIR[:SCALE]]...
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/bench.h"

namespace gptq::cli {

command register_bench(CLI::App& app) {
    auto o    = std::make_shared<bench_params>();
    auto json = std::make_shared<bool>(false);
    auto sub =
        app.add_subcommand("bench", "prefill / decode speed, time to first token and peak memory per batch size");
    sub->add_option("model", o->model_path, "model folder (FP16/BF16 or GPTQ checkpoint)")->required();
    sub->add_option("--device", o->device, "cpu, cuda or cuda:N (the GPU: batches of up to 256 sequences)")
        ->capture_default_str();
    add_offload_options(sub, &o->device_map, &o->max_memory);
    add_lora_option(sub, &o->loras, "several are summed (the --compare-fp16 original runs without)");
    sub->add_option("--batch", o->batches, "batch sizes, comma-separated")
        ->delimiter(',')
        ->capture_default_str()
        ->check(CLI::Range(int64_t(1), int64_t(4096)));
    sub->add_option("--prompt", o->prompt, "prompt tokens per sequence (random ids)")
        ->capture_default_str()
        ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
    sub->add_option("--gen", o->gen, "decode steps, one token per sequence each")
        ->capture_default_str()
        ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
    sub->add_option("--compare-fp16", o->compare_fp16, "the FP16 original, measured in the same run (ratios)");
    sub->add_option("--repeat", o->repeat, "timed iterations per row (median), after one warm-up")
        ->capture_default_str()
        ->check(CLI::Range(1, 1000));
    sub->add_option("--threads", o->n_threads, "CPU threads (0: all cores)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--seed", o->seed, "seed of the random token ids")->capture_default_str();
    sub->add_flag("--profile-ops", o->profile_ops,
                  "with --device cuda: after the timed runs, one more iteration whose decode steps run uncaptured (no "
                  "CUDA graph) with a CUDA event after each op; prints GPU time per op kind (JSON: op_profile)");
    sub->add_flag("--json", *json, "one JSON object per (model, batch) row instead of the table");
    return {sub, [o, json] {
                auto r = bench_run(*o);
                if (!r) return report_error(r.error());
                const std::string out = *json ? bench_result_json(*r) : bench_result_text(*r);
                std::fputs(out.c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
