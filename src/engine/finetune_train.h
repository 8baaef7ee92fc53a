// The parts of gptq finetune (include/gptq/finetune.h) below the flow, exposed for the tests:
// training data into sequences with loss targets, the learning-rate schedule, and the trainer
// (AdamW over one LoRA adapter of a llama_model). docs/lora.md "Fine-tuning".
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/llama.h"
#include "model/lora.h"

namespace gptq {

class tokenizer;

// One training sequence: ids and, per row, the token it is trained to predict (the next id), -1
// for none (the last row; chat: rows whose next token is not an assistant token).
struct finetune_seq {
    std::vector<int32_t> ids;
    std::vector<int32_t> targets;
};

struct finetune_data {
    std::vector<finetune_seq> seqs;
    int64_t                   n_truncated = 0;  // chat samples cut to seqlen
    int64_t                   n_dropped   = 0;  // samples without a target (or shorter than 2 tokens)
};

// Reads a .txt or .jsonl file (include/gptq/finetune.h) into sequences of at most seqlen tokens;
// "messages" are rendered with chat_template (empty: the tokenizer's). Errors name the file and
// line: no data, a line that is not a JSON object with "text" or "messages", messages without a
// chat template, a template that renders a prefix of a conversation differently.
result<finetune_data> finetune_data_read(const std::string& path, const tokenizer& tok, int64_t seqlen,
                                         const std::string& chat_template = "");

// transformers' get_cosine_schedule_with_warmup: lr * step / warmup during warm-up, then
// lr * 0.5 * (1 + cos(pi * progress)), progress = (step - warmup) / (total - warmup). step from 0.
double finetune_lr_at(double lr, int64_t step, int64_t total, int64_t warmup);

// A Fisher-Yates shuffle of 0 .. n-1 from a 64-bit Mersenne Twister (portable: no std
// distribution), the data order of each epoch (seed + epoch).
std::vector<int64_t> finetune_shuffle(int64_t n, uint64_t seed);

struct adamw_config {
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    double max_grad_norm = 1.0;  // 0: no clipping
};

struct train_step_stats {
    double  loss      = 0.0;  // mean NLL over the step's targets
    int64_t n_targets = 0;
    int64_t n_tokens  = 0;
    double  grad_norm = 0.0;  // before clipping
    double  lr        = 0.0;
};

// The backend-neutral loss and gradients of one micro-batch with the trainer's adapter: the summed
// NLL of its targets and, with grads (nullptr: eval only), d(grad_scale * NLL)/dA, dB ADDED to
// *grads. CPU: llama_model::lora_loss_grad; GPU: llama_cuda_model::lora_loss_grad (finetune.cpp).
// dropout: the LoRA branches' for this micro-batch (p 0: none; eval passes none).
using lora_loss_grad_fn = std::function<result<double>(
    const ops_context& ctx, const train_batch& b, lora_adapter* grads, float grad_scale, lora_dropout_spec dropout)>;

// AdamW (torch.optim.AdamW's arithmetic, on the host) on the A and B of `adapter`, whose loss and
// gradients `fn` computes from the adapter's current values (it sees every update).
class lora_trainer {
public:
    lora_trainer(lora_loss_grad_fn fn, std::shared_ptr<lora_adapter> adapter, adamw_config cfg);
    // The CPU model, which holds `adapter` as LoRA adapter index lora_index.
    lora_trainer(llama_model& model, std::shared_ptr<lora_adapter> adapter, int32_t lora_index, adamw_config cfg);

    // One optimizer step over the micro-batches: gradients of the mean NLL over all their targets
    // (summed over micro-batches, each scaled by 1 / all targets), global norm clipped to
    // max_grad_norm (torch's clip_grad_norm_: factor max / (norm + 1e-6) when below 1), then AdamW
    // with learning rate lr.
    result<train_step_stats> step(const ops_context& ctx, const std::vector<train_batch>& micro, double lr);
    // Mean NLL over the batches' targets (no gradients, no dropout); NaN when they have none.
    result<double> eval(const ops_context& ctx, const std::vector<train_batch>& batches);
    // LoRA dropout p in [0, 1) in the training steps (PEFT's lora_dropout), masks seeded by seed.
    void set_dropout(double p, uint64_t seed) {
        dropout_p_    = p;
        dropout_seed_ = seed;
    }

    lora_adapter&       adapter() { return *adapter_; }
    const lora_adapter& grads() const { return grads_; }  // of the last step, before clipping
    lora_adapter&       exp_avg() { return m_; }
    lora_adapter&       exp_avg_sq() { return v_; }
    int64_t&            adam_steps() { return t_; }

private:
    lora_loss_grad_fn             loss_grad_;
    std::shared_ptr<lora_adapter> adapter_;
    adamw_config                  cfg_;
    lora_adapter                  grads_, m_, v_;  // the adapter's shapes
    int64_t                       t_            = 0;
    double                        dropout_p_    = 0.0;
    uint64_t                      dropout_seed_ = 0;
};

// A zeroed adapter of a's shapes (gradients, Adam moments).
lora_adapter lora_adapter_zeros_like(const lora_adapter& a);

// Sequences [i0, i1) of `order` into train_batches of up to `batch` sequences each.
std::vector<train_batch> finetune_batches(const std::vector<finetune_seq>& seqs, const std::vector<int64_t>& order,
                                          int64_t i0, int64_t i1, int64_t batch);

}  // namespace gptq
