// gptq finetune: LoRA adapters trained on a frozen model (a GPTQ checkpoint stays 4-bit: QLoRA-
// style), written in PEFT's format (docs/lora.md "Fine-tuning"; issue 21 Part 2). CPU or GPU (--device).
//
// Data: a .txt file (tokenized whole, BOS first, cut into windows of seqlen tokens) or a .jsonl
// file, one object per line with a string "text" (tokenized with BOS, cut the same way) or a chat
// "messages" array of {"role", "content"} rendered with the model's chat template, the loss then on
// the assistant messages' tokens only. A held-out share of the sequences gives an eval loss.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gptq/status.h"

namespace gptq {

struct finetune_params {
    std::string model_path;  // base model folder (GPTQ checkpoint or F16/BF16/F32)
    std::string data_path;   // .txt or .jsonl
    std::string out_dir;     // the adapter folder written (and its checkpoint/ while training)
    int64_t     r             = 16;
    double      alpha         = 32.0;
    bool        use_rslora    = false;                   // scale alpha / sqrt(r) instead of alpha / r
    std::string targets       = "q,k,v,o,gate,up,down";  // comma list: q, k, v, o, gate, up, down (or q_proj, ...)
    double      lr            = 2e-4;
    int64_t     epochs        = 1;
    int64_t     max_steps     = 0;  // > 0: stop after this many optimizer steps (the schedule spans them)
    int64_t     seqlen        = 512;
    int64_t     batch         = 8;  // sequences per micro-batch
    int64_t     grad_accum    = 1;  // micro-batches per optimizer step
    uint64_t    seed          = 0;
    std::string device        = "cpu";   // cpu, cuda, cuda:N
    std::string gpu_math      = "tf32";  // GPU: the base's products on tf32 or bf16 tensor cores, or f32 (exact)
    bool        profile_ops   = false;   // GPU: log each step's GPU time per op kind (slower)
    double      eval_fraction = 0.05;    // share of the sequences held out for the eval loss
    int64_t     eval_every    = 0;       // > 0: eval loss every N steps too (always after each epoch)
    int64_t     save_every    = 0;       // > 0: checkpoint every N steps (out_dir/checkpoint)
    bool        resume        = false;
    double      warmup_ratio  = 0.03;  // linear warm-up over ceil(ratio * total steps), then cosine to 0
    double      weight_decay  = 0.0;   // AdamW, betas 0.9 / 0.999, eps 1e-8
    double      max_grad_norm = 1.0;   // global gradient-norm clip (0: off)
    double      lora_dropout  = 0.0;   // PEFT's lora_dropout: on each LoRA branch's input, training steps only
    int         n_threads     = 0;     // 0 = all cores
    bool        progress      = true;
    std::string init_adapter{};        // start from this PEFT adapter (same r) instead of PEFT's init
    std::string chat_template_file{};  // "messages" rendered with this template (Jinja text or a
                                       // tokenizer_config.json) instead of the model's
};

struct finetune_result {
    int64_t             steps              = 0;  // optimizer steps done in this run (after a resume: the new ones)
    int64_t             total_steps        = 0;
    int64_t             n_train_seqs       = 0;
    int64_t             n_eval_seqs        = 0;
    int64_t             n_train_tokens     = 0;    // tokens run through the model in this run
    double              train_loss         = 0.0;  // mean over the targets of the last optimizer step
    double              eval_loss_first    = 0.0;  // before the first step of this run (NaN without eval data)
    double              eval_loss          = 0.0;  // after the last step
    double              seconds            = 0.0;
    double              tokens_per_second  = 0.0;
    int64_t             n_trainable_params = 0;
    std::string         out_dir;
    std::vector<double> step_seconds;           // each optimizer step of this run (wall clock)
    std::vector<double> step_losses;            // each optimizer step's mean train loss
    double              step_seconds_mean = 0;  // mean over the steps after the first (0: fewer than 2 steps)
    // GPU runs: device memory in use after the last step (cudaMemGetInfo: total - free; the
    // training buffers only grow, so this is their peak), the weights' and training's own bytes.
    uint64_t device_used_bytes = 0, device_weight_bytes = 0, device_train_bytes = 0;
};

result<finetune_result> finetune_run(const finetune_params& params);

std::string finetune_result_text(const finetune_result& r);
std::string finetune_result_json(const finetune_result& r);  // one line, no trailing newline

}  // namespace gptq
