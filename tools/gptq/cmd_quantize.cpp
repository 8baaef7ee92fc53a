// gptq quantize MODEL -o OUT [--bits 4] [--group-size 128] [--desc-act] [--sym|--no-sym] [--device cpu|cuda] ...
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/quantize.h"

namespace gptq::cli {

namespace {

// Measured on 2026-11-24 (docs/results.md): WikiText-2 test perplexity, seqlen 512, 128 x 512
// calibration tokens from the bundled calibration text.
constexpr const char* k_presets =
    "\nPresets, measured on the bundled tiny-llama (WikiText-2 test ppl at seqlen 512; FP16: 153.97, 10.0 MiB):\n"
    "  --bits 8 --group-size 128   7.1 MiB   GPTQ 154.01   RTN 154.21\n"
    "  --bits 4 --group-size 128   5.6 MiB   GPTQ 161.05   RTN 166.07   (--desc-act 157.73, --no-sym 156.23)\n"
    "  --bits 3 --group-size 128   5.2 MiB   GPTQ 188.9    RTN 205.1    (first 40 windows only; FP16 170.5 there)\n"
    "small-llama (23 M) and the options (--desc-act, --mse, group size -1, --no-sym): docs/results.md\n";

}  // namespace

command register_quantize(CLI::App& app) {
    auto o      = std::make_shared<quantize_params>();
    auto no_sym = std::make_shared<bool>(false);
    auto no_ts  = std::make_shared<bool>(false);
    auto shard  = std::make_shared<std::string>("4GB");
    auto sub    = app.add_subcommand("quantize", "GPTQ-quantize a Hugging Face checkpoint into a GPTQ checkpoint");
    sub->footer(k_presets);
    sub->add_option("model", o->model_path, "Hugging Face model folder (config.json, safetensors, tokenizer)")
        ->required();
    sub->add_option("-o,--output", o->output_path, "output folder (must not exist)")->required();
    sub->add_option("--bits", o->bits, "bits per weight: 2, 3, 4 or 8")
        ->capture_default_str()
        ->check(CLI::IsMember({2, 3, 4, 8}));
    sub->add_option("--group-size", o->group_size, "input columns per scale/zero group; -1 = whole row")
        ->capture_default_str();
    sub->add_flag("--desc-act", o->desc_act, "act-order: quantize columns by decreasing Hessian diagonal");
    sub->add_flag("--gar", o->gar,
                  "group-aware act-order: act-order inside each group, groups by importance; no g_idx reorder, "
                  "so kernels keep full speed (excludes --desc-act)");
    sub->add_flag("--sym,!--no-sym", o->sym, "symmetric grid (zero point 2^(bits-1)); --no-sym: asymmetric")
        ->capture_default_str();
    sub->add_flag("--static-groups", o->static_groups,
                  "fix group scales before quantizing (with --desc-act: no g_idx reorder)");
    sub->add_flag("--no-true-sequential", *no_ts,
                  "quantize all linears of a layer from one pass (default: q,k,v -> o -> gate,up -> down)");
    sub->add_option("--damp-percent", o->damp_percent, "damping, as a fraction of the Hessian's mean diagonal")
        ->capture_default_str()
        ->check(CLI::Range(1e-9, 0.999999));
    sub->add_flag("--mse", o->mse, "search the clipping range that minimises the quantization error");
    sub->add_flag("--mse-hessian", o->mse_hessian,
                  "search each group's clipping range on its diag(H)-weighted error (CPU solve only; excludes --mse)");
    auto* ga =
        sub->add_flag("--gptaq", o->gptaq,
                      "GPTAQ (GPTQModel's GPTQv2, asymmetric calibration): fit each linear to the full-precision "
                      "model's output, not only its own quantized-path input; carries the full-precision "
                      "calibration stream beside the quantized one: 2x the calibration activations' memory "
                      "(CPU only, dense models)");
    sub->add_option("--gptaq-alpha", o->gptaq_alpha, "with --gptaq: the weight of its correction, in [0, 1]")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 1.0))
        ->needs(ga);
    sub->add_flag("--quantize-lm-head", o->quantize_lm_head,
                  "quantize lm_head too (GPTQ on the final norm's output; \"lm_head\": true as GPTQModel writes "
                  "it); a tied lm_head gets its own copy, the embeddings stay as they are (F16 unless "
                  "--quantize-embeddings)");
    auto* qe =
        sub->add_flag("--quantize-embeddings", o->quantize_embeddings,
                      "quantize the input embedding table too (GPTQModel's quantized model.embed_tokens; of the peers "
                      "only GPTQModel reads it, transformers loads it silently wrong); a tied lm_head uses the "
                      "dequantized table (a file GPTQModel refuses: add --quantize-lm-head for one it reads)");
    sub->add_option("--embed-bits", o->embed_bits, "with --quantize-embeddings: the table's bits (2, 3, 4 or 8)")
        ->capture_default_str()
        ->check(CLI::IsMember({2, 3, 4, 8}))
        ->needs(qe);
    sub->add_option("--embed-group-size", o->embed_group_size,
                    "with --quantize-embeddings: consecutive token ids per scale (default: --group-size)")
        ->needs(qe);
    sub->add_option("--embed-clip", o->embed_clip,
                    "with --quantize-embeddings: each group's clipping range: none (full range), uniform (least "
                    "squared error) or frequency (least error weighted by the calibration text's token counts; "
                    "the default, uniform with --method rtn)")
        ->check(CLI::IsMember({"none", "uniform", "frequency"}))
        ->needs(qe);
    sub->add_option("--target-bpw", o->target_bpw,
                    "mixed precision: bits (2/3/4/8) per module chosen by measured sensitivity (--bpw-sensitivity) so "
                    "that the "
                    "quantized linears take at most this many bits per weight (scales, zeros, g_idx counted); "
                    "written as GPTQModel `dynamic` rules")
        ->check(CLI::Range(2.0, 16.0));
    sub->add_option("--bpw-group-sizes", o->bpw_group_sizes,
                    "with --target-bpw: group sizes the plan may also choose besides --group-size (e.g. 32 64)");
    sub->add_option("--bpw-sensitivity", o->bpw_sensitivity,
                    "with --target-bpw: what the plan minimises: output (each unit's effect on the model's "
                    "next-token distribution, KL on --bpw-windows calibration windows) or hessian (each module's "
                    "Hessian-weighted GPTQ error on its own layer)")
        ->capture_default_str()
        ->check(CLI::IsMember({"output", "hessian"}));
    sub->add_option("--bpw-windows", o->bpw_windows,
                    "with --target-bpw and --bpw-sensitivity output: the calibration windows the output is "
                    "measured on (the first ones)")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--bpw-measured", o->bpw_measured,
                    "with --target-bpw: plan from the errors measured by an earlier run of this model (its "
                    "OUT.partial/plan.json, or its --report JSON) instead of measuring again");
    sub->add_option("--method", o->method, "gptq, or rtn (round to nearest; no calibration)")
        ->capture_default_str()
        ->check(CLI::IsMember({"gptq", "rtn"}));
    sub->add_option("--format", o->format,
                    "checkpoint zero-point format: gptq (v1, the default: every reader takes it; with --no-sym "
                    "zero points are kept >= 1) or gptq_v2 (GPTQModel's; AutoGPTQ and other v1-only readers "
                    "misread it)")
        ->check(CLI::IsMember({"gptq", "gptq_v2"}));
    sub->add_option("--calib", o->calib,
                    "calibration text: 'default' (bundled), 'wikitext2' (test split: biased), or "
                    "a .jsonl (\"text\" per line) / text file")
        ->capture_default_str();
    sub->add_option("--nsamples", o->nsamples, "calibration windows")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--seqlen", o->seqlen, "tokens per calibration window")
        ->capture_default_str()
        ->check(CLI::Range(2, 1 << 20));
    sub->add_option("--calib-sampling", o->calib_sampling,
                    "calibration windows: random (seeded offsets across the text) or contiguous (from the start)")
        ->capture_default_str()
        ->check(CLI::IsMember({"random", "contiguous"}));
    sub->add_option("--seed", o->seed, "seed of the window sampler")->capture_default_str();
    sub->add_option("--max-shard-size", *shard, "split the weights into shards beyond this size (e.g. 4GB, 500MB)")
        ->capture_default_str();
    sub->add_option("--moe-coverage", o->moe_coverage,
                    "mixture of experts: what an expert that calibration routed fewer than --moe-min-tokens tokens to "
                    "gets: route-all (its Hessians from every calibration token; the layer output keeps the real "
                    "routing), rtn (round to nearest, with a warning) or fail")
        ->capture_default_str()
        ->check(CLI::IsMember({"route-all", "rtn", "fail"}));
    sub->add_option("--moe-min-tokens", o->moe_min_tokens,
                    "mixture of experts: the fewest routed calibration tokens an expert's Hessian is taken from "
                    "(-1: 2 * hidden_size / 16)")
        ->capture_default_str()
        ->check(CLI::Range(int64_t(-1), int64_t(1) << 40));
    sub->add_flag("--resume", o->resume, "continue an interrupted run (OUT.partial) from its last finished layer");
    sub->add_option("--report", o->report_path, "write a JSON report (per-layer errors, timings) here");
    sub->add_option("--threads", o->n_threads, "CPU threads (0: all cores)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--device", o->device,
                    "where each linear's GPTQ solve runs: cpu, or cuda[:N] (EXPERIMENTAL: Cholesky and column "
                    "loop on the GPU, calibration on the CPU)")
        ->capture_default_str();
    sub->add_option("--stop-after-layers", o->stop_after_layers, "testing: stop after N layers as if interrupted")
        ->group("");
    return {sub, [o, no_ts, shard] {
                o->true_sequential = !*no_ts;
                o->max_shard_bytes = parse_size(*shard);
                if (o->max_shard_bytes == 0)
                    return report_error(status(status_code::STATUS_INVALID_ARGUMENT,
                                               "--max-shard-size '" + *shard + "' is not a size like 4GB or 500MB"));
                auto r = quantize_model(*o);
                if (!r) return report_error(r.error());
                std::fputs(quantize_report_summary(*r).c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
