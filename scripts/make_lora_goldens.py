#!/usr/bin/env python3
"""Golden fixtures of LoRA adapters at inference (docs/lora.md), made with peft + transformers.

Writes tests/data/lora/:
  adapter-a/   PEFT adapter (A and B stored in F16) (adapter_config.json + adapter_model.safetensors): r 8, lora_alpha 16,
               targets q,k,v,o,gate,up,down, seeded random A and B (scale alpha/r = 2)
  adapter-b/   a second adapter: r 4, lora_alpha 8, use_rslora (scale 8/sqrt(4) = 4), targets
               q_proj, v_proj and down_proj as a regex string (PEFT's other target_modules form)
  golden.safetensors, the layout of scripts/make_arch_goldens.py with one prefix per case:
    <case>.seq<k>.ids / .positions / .logits / .greedy  (F32 compute, eager attention)
  cases:
    fp16_a     models/tiny-llama + adapter-a (unmerged, peft's LoraModel)
    fp16_b     models/tiny-llama + adapter-b
    fp16_ab    both adapters active at once (peft's set_adapter([a, b]): the sum of their products)
    fp16_a_s05 adapter-a with its scale multiplied by 0.5 (our --lora DIR:0.5)
    merged_a   peft's merge_and_unload of adapter-a into the F16 model (merged in F16, as saved),
               run in F32: what `gptq merge-lora` must reproduce
    gptq_a     adapter-a on the GPTQ checkpoint tests/data/interop/gptqmodel-w4-act-order (assembled
               from its fixture.json), each quantized linear dequantized in F32 (W = scale * (q - z),
               format.md) and wrapped by peft: base_int4(x) + scale * (x A^T) B^T. The fixture has 2
               layers, so adapter-a's first 2 layers (adapter-a2/) are used. (peft over GPTQModel's own
               CPU kernel, TorchAtenLinear, lands within 6e-3 relative of these logits: its F16 math.)

Run (CPU, under a minute): /work/venv/bin/python scripts/make_lora_goldens.py
Deterministic: fixed seeds; rerunning rewrites identical files.
"""
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "device"))
from make_logit_goldens import save_safetensors  # noqa: E402  (the one minimal safetensors writer)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "lora")
TINY = os.path.join(ROOT, "models", "tiny-llama")
GPTQ_FIXTURE = os.path.join(ROOT, "tests", "data", "interop", "gptqmodel-w4-act-order")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_POS = 2  # logits rows kept per sequence (the middle and the last)
N_GREEDY = 6


def load_f32(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def randomize_lora(model, seed, std_a, std_b):
    """Seeded random A and B for every LoRA module (PEFT initializes B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std_a)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std_b)


def sequences(vocab):
    g = torch.Generator().manual_seed(21)
    out = []
    for n in (9, 40):
        ids = torch.randint(3, vocab, (n,), generator=g, dtype=torch.int64)
        ids[0] = 1
        out.append(ids)
    return out


@torch.no_grad()
def case_tensors(model, prefix, seqs):
    t = {}
    for k, ids in enumerate(seqs):
        n = ids.numel()
        logits = model(ids[None]).logits[0].float()
        pos = torch.tensor(sorted({n // 2, n - 1}), dtype=torch.int32)[:N_POS]
        cur = ids.clone()
        greedy = []
        for _ in range(N_GREEDY):
            nxt = int(model(cur[None]).logits[0, -1].argmax())
            greedy.append(nxt)
            cur = torch.cat([cur, torch.tensor([nxt])])
        p = f"{prefix}.seq{k}."
        t[p + "ids"] = ids.to(torch.int32)
        t[p + "positions"] = pos
        t[p + "logits"] = logits[pos.long()].contiguous()
        t[p + "greedy"] = torch.tensor(greedy, dtype=torch.int32)
    return t


def make_adapters(tmp):
    base = load_f32(TINY)
    cfg_a = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                       task_type="CAUSAL_LM")
    pa = get_peft_model(base, cfg_a)
    randomize_lora(pa, 1, 0.05, 0.05)
    pa.save_pretrained(os.path.join(OUT, "adapter-a"))
    base = load_f32(TINY)
    cfg_b = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                       lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")
    pb = get_peft_model(base, cfg_b)
    randomize_lora(pb, 2, 0.05, 0.05)
    pb.save_pretrained(os.path.join(OUT, "adapter-b"))
    # Stored in F16 (half the bytes; the goldens below load them back, so they see the same values).
    # PEFT writes target_modules from a set (its order varies run to run) and the base model's
    # absolute path: sorted, and the path relative to the repository, so reruns write the same bytes.
    from safetensors.torch import load_file, save_file
    for d in ("adapter-a", "adapter-b"):
        cfg_path = os.path.join(OUT, d, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["base_model_name_or_path"] = "models/tiny-llama"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        f = os.path.join(OUT, d, "adapter_model.safetensors")
        save_file({k: v.half() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    # adapter-a cut to 2 layers for the 2-layer GPTQ fixture
    sd = load_file(os.path.join(OUT, "adapter-a", "adapter_model.safetensors"))
    keep = {k: v for k, v in sd.items() if ".layers.0." in k or ".layers.1." in k}
    os.makedirs(os.path.join(OUT, "adapter-a2"), exist_ok=True)
    save_file(keep, os.path.join(OUT, "adapter-a2", "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(OUT, "adapter-a", "adapter_config.json"), os.path.join(OUT, "adapter-a2"))


def assemble_fixture(dst):
    """tests/data/interop/<name>/fixture.json: copy / stored / splice (test_interop_fixtures.cpp)."""
    fx = json.load(open(os.path.join(GPTQ_FIXTURE, "fixture.json")))
    for fname, e in fx["files"].items():
        data = bytearray(open(os.path.join(ROOT, e["stored"]), "rb").read()) if "stored" in e else None
        if "copy" in e:
            data = bytearray(open(os.path.join(ROOT, e["copy"]), "rb").read())
        for s in e.get("splice", []):
            src = open(os.path.join(ROOT, s["from"]), "rb").read()[s["offset"]:s["offset"] + s["length"]]
            data[s["at"]:s["at"]] = src
        assert len(data) == e["size"], (fname, len(data), e["size"])
        open(os.path.join(dst, fname), "wb").write(bytes(data))


def dequantized_gptq_model(folder):
    """The GPTQ checkpoint as an F32 transformers model with every linear dequantized (format.md)."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(folder, "config.json")))
    q = cfg.pop("quantization_config")
    bits = q["bits"]
    sd = load_file(os.path.join(folder, "model.safetensors"))
    tmp = tempfile.mkdtemp()
    json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"))
    dense = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            m = k[: -len(".qweight")]
            qw, qz = sd[m + ".qweight"], sd[m + ".qzeros"]
            scales, g_idx = sd[m + ".scales"].float(), sd[m + ".g_idx"].long()
            shifts = torch.arange(0, 32, bits, dtype=torch.int32)
            w = ((qw[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, qw.shape[1])
            z = ((qz[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)).reshape(qz.shape[0], -1)
            z = z + 1  # v1 zeros (the fixture's format: checkpoint_format gptq)
            wf = scales[g_idx] * (w.float() - z[g_idx].float())  # [n_in, n_out]
            dense[m + ".weight"] = wf.t().contiguous()
        elif k.rsplit(".", 1)[-1] in ("qzeros", "scales", "g_idx"):
            continue
        else:
            dense[k] = v.float()
    from safetensors.torch import save_file
    save_file(dense, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return load_f32(tmp)


def main():
    os.makedirs(OUT, exist_ok=True)
    make_adapters(None)
    tensors = {}
    base = load_f32(TINY)
    seqs = sequences(base.config.vocab_size)
    a = os.path.join(OUT, "adapter-a")
    b = os.path.join(OUT, "adapter-b")

    pm = PeftModel.from_pretrained(base, a, adapter_name="a").eval()
    tensors.update(case_tensors(pm, "fp16_a", seqs))
    for mod in pm.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "a" in mod.scaling:
            mod.scale_layer(0.5)
    tensors.update(case_tensors(pm, "fp16_a_s05", seqs))
    for mod in pm.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "a" in mod.scaling:
            mod.unscale_layer(0.5)
    pm.load_adapter(b, adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    tensors.update(case_tensors(pm, "fp16_ab", seqs))
    pm.base_model.set_adapter("b")
    tensors.update(case_tensors(pm, "fp16_b", seqs))

    base16 = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float16)
    merged = PeftModel.from_pretrained(base16, a).merge_and_unload()
    tmp = tempfile.mkdtemp()
    merged.save_pretrained(tmp)
    tensors.update(case_tensors(load_f32(tmp), "merged_a", seqs))

    gdir = tempfile.mkdtemp()
    assemble_fixture(gdir)
    gbase = dequantized_gptq_model(gdir)
    gm = PeftModel.from_pretrained(gbase, os.path.join(OUT, "adapter-a2")).eval()
    tensors.update(case_tensors(gm, "gptq_a", seqs))

    meta = {"source": "scripts/make_lora_goldens.py", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__}
    save_safetensors(os.path.join(OUT, "golden.safetensors"), tensors, meta)
    for d in ("adapter-a", "adapter-b", "adapter-a2"):
        readme = os.path.join(OUT, d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
