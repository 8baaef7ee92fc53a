// gptq finetune MODEL --data FILE -o DIR: a LoRA adapter trained on a frozen (GPTQ or FP16) model,
// written in PEFT's format (docs/lora.md "Fine-tuning").
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/finetune.h"

namespace gptq::cli {

command register_finetune(CLI::App& app) {
    auto p    = std::make_shared<finetune_params>();
    auto json = std::make_shared<bool>(false);
    auto sub  = app.add_subcommand("finetune",
                                   "train a LoRA adapter on a frozen model (a GPTQ checkpoint stays 4-bit), written in "
                                    "PEFT's format");
    sub->add_option("model", p->model_path, "base model folder (GPTQ checkpoint or FP16)")->required();
    sub->add_option("--data", p->data_path,
                    ".txt (cut into --seqlen windows) or .jsonl with \"text\" or chat \"messages\" (loss on the "
                    "assistant's tokens)")
        ->required();
    sub->add_option("-o,--output", p->out_dir, "adapter folder to write (new or empty; with --resume: the run's)")
        ->required();
    sub->add_option("--r", p->r, "LoRA rank")->capture_default_str();
    sub->add_option("--alpha", p->alpha, "lora_alpha (scale alpha / r)")->capture_default_str();
    sub->add_flag("--rslora", p->use_rslora, "scale alpha / sqrt(r) (use_rslora)");
    sub->add_option("--targets", p->targets, "adapted linears: q,k,v,o,gate,up,down")->capture_default_str();
    sub->add_option("--lr", p->lr, "peak learning rate (AdamW)")->capture_default_str();
    sub->add_option("--epochs", p->epochs, "passes over the training sequences")->capture_default_str();
    sub->add_option("--max-steps", p->max_steps, "stop after N optimizer steps (0: epochs decide)")
        ->capture_default_str();
    sub->add_option("--seqlen", p->seqlen, "tokens per sequence at most")->capture_default_str();
    sub->add_option("--batch", p->batch, "sequences per micro-batch")->capture_default_str();
    sub->add_option("--grad-accum", p->grad_accum, "micro-batches per optimizer step")->capture_default_str();
    sub->add_option("--seed", p->seed, "seed of the init, the data order and the eval split")->capture_default_str();
    sub->add_option("--device", p->device, "cpu, cuda or cuda:N (the GPU: docs/lora.md \"Fine-tuning on the GPU\")")
        ->capture_default_str();
    sub->add_option("--gpu-math", p->gpu_math,
                    "GPU: the base's products on tf32 or bf16 tensor cores (F32 accumulation), or f32 (exact)")
        ->capture_default_str();
    sub->add_flag("--profile-ops", p->profile_ops, "GPU: log each step's GPU time per op kind (slower)");
    sub->add_option("--eval-fraction", p->eval_fraction, "share of the sequences held out for the eval loss")
        ->capture_default_str();
    sub->add_option("--eval-every", p->eval_every, "eval loss every N steps too (0: after each epoch only)")
        ->capture_default_str();
    sub->add_option("--save-every", p->save_every, "checkpoint (adapter, optimizer, step) every N steps (0: none)")
        ->capture_default_str();
    sub->add_flag("--resume", p->resume, "continue from the checkpoint in -o (same settings)");
    sub->add_option("--warmup-ratio", p->warmup_ratio, "linear warm-up share of the steps, then cosine decay")
        ->capture_default_str();
    sub->add_option("--weight-decay", p->weight_decay, "AdamW weight decay")->capture_default_str();
    sub->add_option("--max-grad-norm", p->max_grad_norm, "gradient-norm clip (0: off)")->capture_default_str();
    sub->add_option("--lora-dropout", p->lora_dropout,
                    "dropout on each LoRA branch's input in training (PEFT's lora_dropout; seeded by --seed)")
        ->capture_default_str();
    sub->add_option("--init-adapter", p->init_adapter, "start from this PEFT adapter (same targets and r)");
    sub->add_option("--chat-template", p->chat_template_file,
                    "chat template for \"messages\" (Jinja file, or a tokenizer_config.json) instead of the model's");
    sub->add_option("-t,--threads", p->n_threads, "CPU threads (0: all cores)")->capture_default_str();
    sub->add_flag("--json", *json, "print one JSON object instead of text");
    return {sub, [p, json] {
                auto r = finetune_run(*p);
                if (!r) return report_error(r.error());
                const std::string out = *json ? finetune_result_json(*r) + "\n" : finetune_result_text(*r);
                std::printf("%s", out.c_str());
                return 0;
            }};
}

}  // namespace gptq::cli
