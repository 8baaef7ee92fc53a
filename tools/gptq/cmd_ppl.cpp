// gptq ppl MODEL [--dataset wikitext2|PATH] [--seqlen 2048] [--max-windows N] [--threads N]
//              [--device cpu|cuda|cuda:N] [--device-map auto|FILE] [--max-memory SPEC] [--json]
//              [--lora DIR[:SCALE]]...
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/ppl.h"

namespace gptq::cli {

command register_ppl(CLI::App& app) {
    auto o    = std::make_shared<ppl_params>();
    auto json = std::make_shared<bool>(false);
    auto sub  = app.add_subcommand("ppl", "perplexity on WikiText-2 test (or a text file), GPTQ-paper protocol");
    sub->add_option("model", o->model_path, "model folder")->required();
    sub->add_option("--dataset", o->dataset, "'wikitext2' (bundled test split, joined) or a text file read as is")
        ->capture_default_str();
    sub->add_option("--seqlen", o->seqlen, "tokens per window")->capture_default_str()->check(CLI::Range(2, 1 << 20));
    sub->add_option("--max-windows", o->max_windows, "evaluate only the first N windows (0: all)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--threads", o->n_threads, "CPU threads (0: all cores)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--device", o->device, "cpu, cuda or cuda:N (the GPU: F16 weights and activations)")
        ->capture_default_str();
    add_offload_options(sub, &o->device_map, &o->max_memory);
    add_lora_option(sub, &o->loras, "several are summed");
    sub->add_flag("--strict", o->strict, "tensors the model does not use are an error (default: a warning)");
    sub->add_flag("--json", *json, "print one JSON object instead of text");
    return {sub, [o, json] {
                auto r = ppl_run(*o);
                if (!r) return report_error(r.error());
                const std::string out = *json ? ppl_result_json(*r) + "\n" : ppl_result_text(*r);
                std::fputs(out.c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
