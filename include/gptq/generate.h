// Text generation: load a model (FP16/BF16/F32 or GPTQ checkpoint) once, then generate from one
// prompt (streaming the text as it becomes final) or from many prompts as one ragged batch.
// docs/generate.md describes the design.
//
//     GPTQ_ASSIGN_OR_RETURN(auto gen, generator::open({.model_path = dir}));
//     generate_params p;  p.max_new_tokens = 64;  p.sampling.temperature = 0;  // greedy
//     GPTQ_ASSIGN_OR_RETURN(auto r, gen->generate("Once upon a time", p, [](const std::string& s) { fputs(...); }));
//
// Each sequence has its own sampler seeded with sampling.seed, so a prompt's output depends only
// on the prompt and the parameters, not on the other prompts of its batch.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gptq/chat.h"
#include "gptq/lora.h"
#include "gptq/sampler.h"
#include "gptq/status.h"

namespace gptq {

struct generator_options {
    std::string model_path;      // model folder (config.json, tokenizer, safetensors), FP or GPTQ
    std::string device = "cpu";  // "cpu", "cuda" or "cuda:N" (include/gptq/device.h); on the GPU the
                                 // prompts of a batch run one after another (one KV cache)
    int  n_threads = 0;          // CPU threads, 0 = all cores
    bool strict    = false;      // tensors the model does not use: an error (else a warning)
    // CPU: GPTQ linears keep F32 activations (the F32 products transformers computes) instead of
    // int8-rounded ones, one scale per block of up to 128 (the default: faster decode, about the
    // precision of llama.cpp's Q8 activations; docs/model-runtime.md).
    bool exact_activations = false;
    // --device cuda: where the modules live (gptq/plan.h plan_for_device): "auto" or a device-map
    // file, and "0=8GiB,cpu=32GiB"; both empty: everything on the GPU.
    std::string            device_map{};
    std::string            max_memory{};
    std::vector<lora_spec> loras{};  // LoRA adapters applied (summed) to every sequence (docs/lora.md)
};

// A default-constructed generate_params is transformers' default generate() but for the length
// (200 new tokens, not 20); generator::default_params() gives the model's own defaults.
// Generation also stops at the model's context (max_position_embeddings): finish reason "length"
// and a warning; a prompt that fills the whole context is an error.
struct generate_params {
    int64_t max_new_tokens = 200;  // generated tokens at most (an EOS counts)
    int64_t max_length     = 0;    // prompt + generated tokens at most, 0: no such limit (transformers'
                                   // max_length: generation_config.json's, when it has no max_new_tokens)
    sampling_params          sampling;
    std::vector<std::string> stop;                // the text ends before the first of these that appears
    bool                     ignore_eos = false;  // never stop at EOS (EOS logits set to -inf, as
                                                  // transformers' min_new_tokens does)
    bool add_special = true;                      // encode the prompt with BOS (false for rendered chat text)
};

struct generate_result {
    std::string          prompt;
    std::vector<int32_t> prompt_tokens;
    std::vector<int32_t> tokens;         // generated ids, EOS included when it ended the text
    std::string          text;           // decoded new text (special tokens skipped), stop string excluded
    std::string          finish_reason;  // "eos", "stop" or "length"
};

// Timing of one generate / generate_batch call. Prefill: the prompts' forward pass (one ragged
// batch); decode: every later step (forward + sampling + detokenisation).
struct generate_stats {
    int64_t n_sequences      = 0;
    int64_t n_prefill_tokens = 0;  // prompt tokens of all sequences
    int64_t n_decode_tokens  = 0;  // rows run through decode steps (one per active sequence and step)
    double  prefill_seconds  = 0.0;
    double  decode_seconds   = 0.0;
    int     n_threads        = 0;
    double  prefill_tokens_per_second() const { return prefill_seconds > 0 ? n_prefill_tokens / prefill_seconds : 0.0; }
    double  decode_tokens_per_second() const { return decode_seconds > 0 ? n_decode_tokens / decode_seconds : 0.0; }
};

// Called with each piece of new text as soon as it is final (never half a UTF-8 character, never
// a possible beginning of a stop string).
using text_callback = std::function<void(const std::string& piece)>;

class generator {
public:
    static result<std::unique_ptr<generator>> open(const generator_options& options);
    ~generator();

    result<generate_result> generate(const std::string& prompt, const generate_params& params,
                                     const text_callback& on_text = {}, generate_stats* stats = nullptr);

    // All prompts as one batch: one ragged prefill, then decode steps over the sequences still
    // running (a finished one leaves the batch). Results in prompt order.
    result<std::vector<generate_result>> generate_batch(const std::vector<std::string>& prompts,
                                                        const generate_params& params, generate_stats* stats = nullptr);

    // The model's chat template (tokenizer_config.json) rendered for `messages`; an error when the
    // model has none or it uses a construct outside the supported Jinja subset.
    result<std::string> chat_render(const std::vector<chat_message>& messages, bool add_generation_prompt) const;
    bool                has_chat_template() const;

    const std::string& model_path() const;

    // The model's defaults, as transformers' generate() takes them: generation_config.json
    // (do_sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens or else
    // max_length), transformers' GenerationConfig defaults for keys it lacks, and 200 new tokens
    // when it sets no length. docs/generate.md "Defaults".
    const generate_params& default_params() const;
    // The ids that end a sequence: generation_config.json eos_token_id (an int or a list), else
    // config.json's, else the tokenizer's EOS.
    const std::vector<int32_t>& eos_ids() const;
    // Positions the model takes (config.json max_position_embeddings); 0: no limit (dynamic RoPE).
    int64_t context_length() const;
    // Errors for parameters out of range (also checked by generate / generate_batch).
    static status check_params(const generate_params& params);
    // One line: decoding (greedy or sampling with its settings), penalty, lengths, EOS ids, and
    // where the defaults came from. log_settings writes it to stderr (info level: -q hides it).
    std::string describe(const generate_params& params) const;
    void        log_settings(const generate_params& params) const;

private:
    generator();
    struct impl;
    std::unique_ptr<impl> impl_;
};

// The prompts of a --prompts file: one prompt per line (empty lines skipped), or, when the first
// non-empty line starts with '{', JSON Lines whose objects carry a string "prompt". Errors name the
// file and line.
result<std::vector<std::string>> prompts_file_read(const std::string& path);

// One line of JSON for a result of generate_batch (prompt, text, tokens, counts, finish_reason).
std::string generate_result_json(const generate_result& r);

}  // namespace gptq
