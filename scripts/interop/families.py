#!/usr/bin/env python3
"""The new families (issue 16 part 2) checked by the peers' own readers (docs/interop.md, "New families").

For each family of tests/data/arch/<name>/ (small seeded random-weight models made by
transformers' own classes, scripts/make_arch_goldens.py) it:
  1. copies config.json and model.safetensors to WORK/<name>/ and adds the byte-level BPE
     tokenizer of `gptq make-random --like micro` (same vocabulary size, 512), for calibration;
  2. quantizes it with `gptq quantize` in each configuration below (small calibration: the
     readers do not care how good the codes are);
  3. loads each checkpoint with each peer reader (interop_common.py: transformers + optimum +
     GPTQModel's torch kernel in F32, GPTQModel.load in F16) and writes, next to the checkpoint,
     golden-<reader>.safetensors: that reader's logits of the fixed sequences of the family's
     golden.safetensors (same ids and positions) and its ppl of the golden's ppl sequence, in the
     layout of tests/common/golden.h. test_interop_families (C++) compares ours with them;
  4. compares WikiText-2 perplexity (seqlen 64, the first --max-windows windows) of each reader
     with `gptq ppl` on the same windows.

  /work/venv/bin/python scripts/interop/families.py --work /tmp/fam --json /tmp/fam/results.json

A reader that refuses a family is a result: its error is recorded. No metadata is changed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

FAMILIES = ("qwen3", "mistral-nemo", "phi3", "gemma2", "gemma3")
CONFIGS = {
    "w4-g32": ["--bits", "4", "--group-size", "32"],
    "w4-g32-asym-act": ["--bits", "4", "--group-size", "32", "--no-sym", "--desc-act"],
    # the same in GPTQModel's v2 zeros: GPTQModel.load refuses asym v1 from a non-GPTQModel writer
    "w4-g32-asym-act-v2": ["--bits", "4", "--group-size", "32", "--no-sym", "--desc-act", "--format", "gptq_v2"],
}
CALIB = ["--nsamples", "8", "--seqlen", "64"]


def prepare(gptq, work, name):
    """WORK/<name>/: the family's FP model plus a 512-token tokenizer (the arch folders have none)."""
    tok = os.path.join(work, "_tokenizer")
    if not os.path.isdir(tok):
        subprocess.run([gptq, "-q", "make-random", "--like", "micro", "-o", tok], check=True, stdout=sys.stderr)
    out = os.path.join(work, name)
    if os.path.isdir(out):
        return out
    os.makedirs(out)
    src = os.path.join(ic.REPO, "tests/data/arch", name)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), out)
    for f in os.listdir(tok):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(tok, f), out)
    return out


def quantize(gptq, model, out, flags):
    if os.path.isfile(os.path.join(out, "quantize_config.json")):
        return
    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [gptq, "-q", "quantize", model, "-o", out] + flags + CALIB
    ic.log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def golden_of(name):
    from safetensors.torch import load_file

    return load_file(os.path.join(ic.REPO, "tests/data/arch", name, "golden.safetensors"))


def reader_golden(model, golden, path):
    """The reader's logits on the family's fixed sequences (golden.h layout), written to path."""
    import math

    import torch
    from safetensors.torch import save_file

    out = {}
    with torch.inference_mode():
        k = 0
        while f"seq{k}.ids" in golden:
            ids = golden[f"seq{k}.ids"].long()
            pos = golden[f"seq{k}.positions"].long()
            logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
            out[f"seq{k}.ids"] = golden[f"seq{k}.ids"].clone()
            out[f"seq{k}.positions"] = golden[f"seq{k}.positions"].clone()
            out[f"seq{k}.logits"] = logits[pos].contiguous()
            k += 1
        ids = golden["ppl.ids"].long()
        logits = model(input_ids=ids[None], use_cache=False).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="mean")
        out["ppl.ids"] = golden["ppl.ids"].clone()
        out["ppl.value"] = torch.tensor([math.exp(float(nll))], dtype=torch.float32)
    save_file(out, path)
    return float(out["ppl.value"][0])


def run_reader(reader, folder, golden, ids, args):
    row = {"reader": reader}
    try:
        # eager: the attention the arch goldens were made with; transformers' default (sdpa)
        # silently drops Gemma 2's attention soft-capping (logits 6.5 % off, measured)
        model = ic.load(reader, folder, attn_implementation="eager")
        row["dtype"] = str(next(model.parameters()).dtype)
        row["seq_ppl"] = reader_golden(model, golden, os.path.join(folder, f"golden-{reader}.safetensors"))
        row.update(ic.perplexity(model, ids, args.seqlen, args.max_windows))
        del model
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        row["error"] = ic.short_error(e)
        traceback.print_exc()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--gptq", default=None)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--readers", default="transformers,gptqmodel")
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gptq = ic.find_gptq(args.gptq)
    os.makedirs(args.work, exist_ok=True)
    results = {"versions": ic.versions(), "gptq": gptq, "seqlen": args.seqlen, "max_windows": args.max_windows,
               "calib": CALIB, "families": []}
    for name in args.families.split(","):
        base = prepare(gptq, args.work, name)
        ids = ic.dataset_ids(base)
        golden = golden_of(name)
        for cfg in args.configs.split(","):
            folder = os.path.join(args.work, f"{name}-{cfg}")
            r = {"family": name, "config": cfg, "flags": CONFIGS[cfg] + CALIB, "folder": folder, "readers": []}
            try:
                quantize(gptq, base, folder, CONFIGS[cfg])
                r["ours"] = ic.ours_ppl(gptq, folder, args.seqlen, args.max_windows)
            except Exception as e:  # noqa: BLE001
                r["error"] = ic.short_error(e)
                results["families"].append(r)
                ic.log(f"{name} {cfg}: ours failed: {r['error']}")
                continue
            for reader in args.readers.split(","):
                row = run_reader(reader, folder, golden, ids, args)
                r["readers"].append(row)
                ic.log(f"{name} {cfg} {reader}: {row.get('ppl', row.get('error'))} (ours {r['ours']['ppl']:.4f})")
            results["families"].append(r)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
