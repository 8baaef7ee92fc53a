// gptq bench: prefill and decode speed of a model at given batch sizes (docs/bench.md).
//
// For each batch size B: B sequences of `prompt` random token ids (seeded; no tokenizer needed)
// are prefilled in one batched forward pass (time to first token = its wall time), then `gen`
// decode steps feed one random token per sequence. One warm-up iteration of the same shape runs
// first and is not counted; the figures are the median over `repeat` timed iterations. With
// compare_fp16, the original model is measured in the same run after the model, and each row of
// the model carries the ratio of its rates to the original's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gptq/lora.h"
#include "gptq/status.h"

namespace gptq {

struct bench_params {
    std::string            model_path;              // model folder (FP16/BF16 or GPTQ checkpoint)
    std::string            compare_fp16;            // optional: the FP16 original, measured in the same run
    std::string            device    = "cpu";       // cpu | cuda[:N]
    std::vector<int64_t>   batches   = {1, 4, 16};  // batch sizes, one row each
    int64_t                prompt    = 512;         // prompt tokens per sequence (>= 1)
    int64_t                gen       = 128;         // decode steps (>= 1), one token per sequence each
    int                    repeat    = 3;           // timed iterations per row (median reported)
    int                    n_threads = 0;           // CPU threads; 0 = all cores
    uint64_t               seed      = 0;           // token ids
    bool                   progress  = true;        // one line per row on stderr
    std::string            device_map{};            // --device cuda: "auto" or a device-map file (gptq/plan.h)
    std::string            max_memory{};            // --device cuda: "0=8GiB,cpu=32GiB"; both empty: all on the GPU
    std::vector<lora_spec> loras{};                 // LoRA adapters on the model (not the FP16 original), summed
    bool                   profile_ops = false;     // --device cuda: one more iteration, decode steps uncaptured
                                                    // with a CUDA event after each op (bench_row::op_profile)
};

// One op kind of the decode step (profile_ops): GPU time from the end of the op before to its end.
struct bench_op_time {
    std::string op;                  // "rms_norm", "linear_q", "linear_qkv", "attention", "stage_wait", ...
    double      calls_per_step = 0;  // launches of this kind per decode step
    double      us_per_step    = 0;
    double      share          = 0;  // of the profiled step's GPU time
};

struct bench_row {
    std::string model;       // folder name of the model
    std::string model_path;  // as given
    std::string role;        // "model", or "fp16" for the --compare-fp16 original
    std::string weights;     // "float16", "bfloat16", "float32" or "gptq-4bit-g128" ...
    std::string device;      // "cpu" / "cuda:0"
    std::string machine;     // CPU model (cpu) or GPU name (cuda)
    int         n_threads = 0;
    int64_t     batch     = 0;
    int64_t     prompt    = 0;
    int64_t     gen       = 0;
    int         repeat    = 0;

    int64_t     prefill_tokens     = 0;    // batch * prompt
    int64_t     decode_tokens      = 0;    // batch * gen
    double      prefill_seconds    = 0.0;  // median
    double      decode_seconds     = 0.0;  // median, all gen steps
    double      prefill_tok_per_s  = 0.0;  // prefill_tokens / prefill_seconds
    double      decode_tok_per_s   = 0.0;  // decode_tokens / decode_seconds
    double      ttft_ms            = 0.0;  // time to first token = prefill wall time
    double      decode_ms_per_step = 0.0;
    uint64_t    peak_memory_bytes  = 0;  // host: peak RSS since the model was loaded; cuda: peak device bytes
    std::string memory_kind;             // "host_rss" or "device"
    double      load_seconds = 0.0;      // opening the model and converting its weights

    // Rates relative to the FP16 original (rows of the model with compare_fp16; else 0).
    double prefill_vs_fp16 = 0.0;
    double decode_vs_fp16  = 0.0;

    // profile_ops: `profile_steps` decode steps run uncaptured (not the graph replays timed above)
    // with an event after each op; wall-clock and GPU (first to last event) time per step; per op.
    int64_t                    profile_steps            = 0;
    double                     profile_wall_ms_per_step = 0.0;
    double                     profile_gpu_us_per_step  = 0.0;
    std::vector<bench_op_time> op_profile;
};

struct bench_result {
    std::vector<bench_row> rows;  // the model's rows, then the original's
};

result<bench_result> bench_run(const bench_params& params);

std::string bench_result_text(const bench_result& r);  // a table
std::string bench_row_json(const bench_row& row);      // one line, no trailing newline
std::string bench_result_json(const bench_result& r);  // one line per row

}  // namespace gptq
