// Perplexity of a model on a text, with the GPTQ paper's protocol: tokenize the whole text once
// (BOS first for Llama-style tokenizers), cut it into non-overlapping windows of seqlen tokens,
// score tokens 1..seqlen-1 of every window from the window's own prefix, ppl = exp(mean NLL).
// The default dataset is WikiText-2 test joined with "\n\n" (data/wikitext2/wiki.test.raw.gptq_join.txt).
#pragma once

#include <cstdint>
#include <string>

#include <vector>

#include "gptq/lora.h"
#include "gptq/status.h"

namespace gptq {

struct ppl_params {
    std::string            model_path;                 // model folder (config.json, tokenizer, safetensors)
    std::string            dataset     = "wikitext2";  // "wikitext2" (bundled) or a path to a text file, read as is
    int64_t                seqlen      = 2048;         // tokens per window
    int64_t                max_windows = 0;            // evaluate only the first N windows; 0 = all
    int                    n_threads   = 0;            // 0 = all cores
    bool                   progress    = true;         // progress bar on stderr (when it is a terminal)
    std::string            device      = "cpu";        // "cpu", "cuda" or "cuda:N" (include/gptq/device.h)
    std::string            device_map{};               // --device cuda: "auto" or a device-map file (gptq/plan.h)
    std::string            max_memory{};               // --device cuda: "0=8GiB,cpu=32GiB"; both empty: all on the GPU
    bool                   strict = false;             // tensors the model does not use: an error (else a warning)
    std::vector<lora_spec> loras{};                    // LoRA adapters applied (summed) to every window (docs/lora.md)
};

struct ppl_result {
    double      ppl               = 0.0;
    double      nll_mean          = 0.0;  // natural log, per predicted token
    int64_t     n_tokens          = 0;    // tokens run through the model: n_windows * seqlen
    int64_t     n_predicted       = 0;    // tokens scored: n_windows * (seqlen - 1)
    int64_t     n_dataset_tokens  = 0;    // tokens of the whole text
    int64_t     n_windows         = 0;
    int64_t     seqlen            = 0;
    int         n_threads         = 0;
    double      seconds           = 0.0;  // forward passes only
    double      tokens_per_second = 0.0;  // n_tokens / seconds
    double      load_seconds      = 0.0;  // model open + tokenization + weight conversion
    std::string dataset_path;
    std::string device        = "cpu";  // where the forward passes ran ("cuda:0")
    uint64_t    device_bytes  = 0;      // GPU memory held by the model (weights, KV cache, activations, staging)
    uint64_t    offload_bytes = 0;      // weights offloaded to pinned host memory (--max-memory / --device-map)
    std::string lora;                   // the LoRA adapters applied ("a+b"), "" none
};

result<ppl_result> ppl_run(const ppl_params& params);

std::string ppl_result_text(const ppl_result& r);
std::string ppl_result_json(const ppl_result& r);  // one line, no trailing newline

}  // namespace gptq
