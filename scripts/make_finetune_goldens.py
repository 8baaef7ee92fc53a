#!/usr/bin/env python3
"""Golden of LoRA fine-tuning (docs/lora.md "Fine-tuning"): two optimizer steps of peft + transformers.

Base: the GPTQ checkpoint tests/data/interop/gptqmodel-w4-act-order (2 layers of tiny-llama's shape),
each quantized linear dequantized in F32 into a plain LlamaForCausalLM (W = scale * (q - z),
format.md): mathematically the model `gptq finetune` trains on, its linears kept 4-bit.
Adapter: tests/data/lora/adapter-a2 (r 8, lora_alpha 16, all seven linears, random A and B, so
both gradients are non-zero), loaded trainable.
Data: 4 sequences of random token ids with per-row targets (the next id, -1 = no loss: masked rows
as chat data has them); step 1 trains on sequences 0 and 1 as one batch, step 2 on 2 and 3.
Each step as transformers' Trainer does it: loss = sum of cross-entropy over the batch's targets /
their count, backward, clip_grad_norm_(1.0), torch.optim.AdamW (betas 0.9/0.999, eps 1e-8,
weight_decay 0), learning rate from get_cosine_schedule_with_warmup(0 warm-up steps, 4 steps).

Writes tests/data/finetune/golden.safetensors:
  batch<s>.ids / .targets / .n_tokens      (int32)
  step<s>.loss / .grad_norm / .lr          ([1] F32)
  step<s>.grad.<peft name>                 gradients before clipping
  step<s>.weight.<peft name>               weights after the step
  (<peft name>: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...)

Run (CPU, seconds): /work/venv/bin/python scripts/make_finetune_goldens.py
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "device"))
from make_logit_goldens import save_safetensors  # noqa: E402
from make_lora_goldens import assemble_fixture, dequantized_gptq_model  # noqa: E402

from peft import PeftModel  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "finetune")
ADAPTER = os.path.join(ROOT, "tests", "data", "lora", "adapter-a2")
LR = 1e-3
TOTAL_STEPS = 4


def sequences(vocab):
    g = torch.Generator().manual_seed(77)
    seqs = []
    for n, masked in ((13, []), (21, list(range(0, 6))), (8, []), (17, list(range(4, 9)))):
        ids = torch.randint(3, vocab, (n,), generator=g, dtype=torch.int64)
        ids[0] = 1
        targets = torch.cat([ids[1:], torch.tensor([-1])])
        for i in masked:
            targets[i] = -1
        seqs.append((ids, targets))
    return seqs


def main():
    torch.manual_seed(0)
    gdir = tempfile.mkdtemp()
    assemble_fixture(gdir)
    base = dequantized_gptq_model(gdir)
    model = PeftModel.from_pretrained(base, ADAPTER, is_trainable=True)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params), list(params)[:4]
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=TOTAL_STEPS)
    seqs = sequences(base.config.vocab_size)
    t = {}
    for step, batch in enumerate(((0, 1), (2, 3))):
        lr = opt.param_groups[0]["lr"]
        n_items = sum(int((seqs[i][1] >= 0).sum()) for i in batch)
        opt.zero_grad()
        loss_sum = 0.0
        for i in batch:
            ids, targets = seqs[i]
            logits = model(input_ids=ids[None]).logits[0].float()
            l = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
            (l / n_items).backward()
            loss_sum += float(l.detach())
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        p = f"step{step + 1}."
        t[p + "loss"] = torch.tensor([loss_sum / n_items])
        t[p + "grad_norm"] = torch.tensor([float(norm)])
        t[p + "lr"] = torch.tensor([lr])
        for n, prm in params.items():
            name = n.replace(".default.weight", ".weight")  # peft's saved names drop the adapter name
            t[p + "grad." + name] = grads[n].contiguous()
            t[p + "weight." + name] = prm.detach().clone().contiguous()
        b = f"batch{step + 1}."
        t[b + "ids"] = torch.cat([seqs[i][0] for i in batch]).to(torch.int32)
        t[b + "targets"] = torch.cat([seqs[i][1] for i in batch]).to(torch.int32)
        t[b + "n_tokens"] = torch.tensor([seqs[i][0].numel() for i in batch], dtype=torch.int32)
        print(f"step {step + 1}: loss {loss_sum / n_items:.6f} grad_norm {float(norm):.6f} lr {lr:.6g}")
    os.makedirs(OUT, exist_ok=True)
    meta = {"source": "scripts/make_finetune_goldens.py", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__}
    save_safetensors(os.path.join(OUT, "golden.safetensors"), t, meta)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
