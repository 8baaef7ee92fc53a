#!/usr/bin/env python3
"""Checks an adapter written by `gptq finetune` with peft + transformers (docs/lora.md "Fine-tuning").

Loads BASE (an F16 model, or a GPTQ checkpoint dequantized in F32 into a plain LlamaForCausalLM, as
scripts/make_lora_goldens.py does) with PeftModel.from_pretrained(ADAPTER), checks that every
lora_A / lora_B tensor of the file is in the model with the same values and that the scaling is
lora_alpha / r, then prints the perplexity of TEXT with the GPTQ-paper protocol (`gptq ppl`'s: BOS,
tokenized once, non-overlapping windows of SEQLEN, tokens 1.. of each window scored) with and
without the adapter, over the first WINDOWS windows: `gptq ppl --lora` gives the same figures.

Usage: /work/venv/bin/python scripts/check_finetune_peft.py BASE ADAPTER TEXT [SEQLEN] [WINDOWS]
"""
import json
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_lora_goldens import dequantized_gptq_model, load_f32  # noqa: E402

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


@torch.no_grad()
def ppl(model, ids, seqlen, windows):
    nll, n = 0.0, 0
    for w in range(min(windows, len(ids) // seqlen)):
        x = torch.tensor(ids[w * seqlen:(w + 1) * seqlen])[None]
        logits = model(input_ids=x).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum"))
        n += seqlen - 1
    return math.exp(nll / n)


def main():
    base_dir, adapter, text = sys.argv[1:4]
    seqlen = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    windows = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    base = dequantized_gptq_model(base_dir) if "quantization_config" in cfg else load_f32(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(open(text, encoding="utf-8").read())["input_ids"]
    before = ppl(base, ids, seqlen, windows)
    model = PeftModel.from_pretrained(base, adapter).eval()
    acfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    sd = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for name, t in sd.items():
        p = params[name.replace(".weight", ".default.weight")]
        assert torch.equal(p.detach().float(), t.float()), name
    scales = {m.scaling["default"] for m in model.modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    want = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg.get("use_rslora") else acfg["r"])
    assert scales == {want}, (scales, want)
    after = ppl(model, ids, seqlen, windows)
    print(f"peft loaded {len(sd)} tensors of {adapter} (scaling {want}); ppl over {windows} windows of {seqlen}: "
          f"base {before:.4f}, with the adapter {after:.4f}")


if __name__ == "__main__":
    main()
