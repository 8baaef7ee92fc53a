#!/usr/bin/env python3
"""Greedy-decoding goldens for `gptq generate`, computed with transformers' generate() (F32, CPU).

For each model and prompt it records the prompt's ids (HF tokenizer, BOS added) and the ids that
model.generate(do_sample=False) produces: 64 new tokens with EOS suppressed (min_new_tokens=64,
i.e. the C++ side's ignore_eos), the same with repetition_penalty 1.3, and one run that may stop
at EOS. It also records the smallest top-1/top-2 logit margin over the steps, so that a mismatch
can be told apart from a near tie.

GPTQ: no GPTQ loader (optimum / gptqmodel) is installed on the device, so the checkpoint made by
`gptq quantize models/tiny-llama --method rtn` is dequantized here from its qweight / qzeros /
scales / g_idx (format.md section 1: W^T[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]),
v1 zeros stored minus one), in F32 exactly as the C++ loader does, and written over the linears
of the base model loaded in F32; the other tensors of an RTN checkpoint are the base model's.

Output: $OUT/goldens.json (see tests/data/generate/README.md). Run on the device machine through
scripts/device/make_generate_goldens.sh.
"""
import argparse
import json
import os
import struct
import sys

import torch

PROMPTS = [
    "The history of the city",
    "Once upon a time, there was a",
    "def fibonacci(n):",
]
N_NEW = 64


def read_safetensors(path):
    """Minimal safetensors reader (I32 / F16 / F32) returning torch tensors."""
    dtypes = {"I32": torch.int32, "F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            raw = bytearray(f.read(b - a))
            t = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]) if raw else torch.empty(0, dtype=dtypes[info["dtype"]])
            out[name] = t.reshape(info["shape"]).clone()
    return out


def unpack_codes(words, bits, axis):
    """Codes packed in a little-endian bit stream of int32 words along `axis` (0: rows, 1: cols)."""
    assert 32 % bits == 0, "only 2/4/8-bit packing is handled here"
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    mask = (1 << bits) - 1
    if axis == 0:  # [R, N] -> [R * per, N]
        c = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return c.reshape(-1, w.shape[1])
    c = (w.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [G, C] -> [G, C * per]
    return c.reshape(w.shape[0], -1)


def dequantize_gptq(tensors, prefix, qcfg):
    bits = int(qcfg["bits"])
    fmt = qcfg.get("checkpoint_format", "gptq")
    qweight = tensors[prefix + ".qweight"]
    n_out = qweight.shape[1]
    q = unpack_codes(qweight, bits, 0)  # [K, N]
    z = unpack_codes(tensors[prefix + ".qzeros"], bits, 1)[:, :n_out]  # [G, N]
    if fmt == "gptq":
        z = z + 1  # v1 stores zero - 1
    s = tensors[prefix + ".scales"].float()  # [G, N]
    g = tensors[prefix + ".g_idx"].long()  # [K]
    wt = s[g] * (q - z[g]).float()  # [K, N], one F32 rounding as in C++
    return wt.t().contiguous()  # [N, K]


def load_model(path, gptq_dir=None):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if gptq_dir:
        with open(os.path.join(gptq_dir, "quantize_config.json")) as f:
            qcfg = json.load(f)
        tensors = read_safetensors(os.path.join(gptq_dir, "quant.safetensors"))
        prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
        mods = dict(m.named_modules())
        worst = 0.0
        for p in prefixes:
            lin = mods[p]
            w = dequantize_gptq(tensors, p, qcfg)
            assert tuple(w.shape) == tuple(lin.weight.shape), (p, w.shape, lin.weight.shape)
            # Sanity check of the unpacking: 4-bit RTN stays within ~15% of the original weights.
            rel = float((w - lin.weight).norm() / lin.weight.norm())
            assert rel < 0.3, f"{p}: dequantized weight is {rel:.3f} away from the original (bad unpacking?)"
            worst = max(worst, rel)
            with torch.no_grad():
                lin.weight.copy_(w)
        print(f"  dequantized {len(prefixes)} GPTQ linears ({qcfg.get('bits')} bits, group {qcfg.get('group_size')}), "
              f"largest relative distance to the original weights {worst:.4f}")
    return m


@torch.no_grad()
def greedy(model, ids, ignore_eos, rep_penalty):
    x = torch.tensor([ids], dtype=torch.long)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_NEW,
                         min_new_tokens=N_NEW if ignore_eos else 0, repetition_penalty=rep_penalty,
                         temperature=None, top_p=None, top_k=None, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    margin = float("inf")
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margin = min(margin, float(top[0] - top[1]))
    return new, margin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH (HF folder)")
    ap.add_argument("--gptq", action="append", default=[], help="NAME=BASE_PATH:STRIPPED_GPTQ_DIR")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    import transformers
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    torch.set_num_threads(8)
    os.makedirs(args.out, exist_ok=True)
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "n_new": N_NEW, "cases": []}
    jobs = [(n, p, None) for n, p in (s.split("=", 1) for s in args.model)]
    for spec in args.gptq:
        name, rest = spec.split("=", 1)
        base, gdir = rest.split(":", 1)
        jobs.append((name, base, gdir))
    for name, path, gdir in jobs:
        print(f"{name}: {path}" + (f" + {gdir}" if gdir else ""), flush=True)
        try:
            model = load_model(path, gdir)
            tok = AutoTokenizer.from_pretrained(path)
            for prompt in PROMPTS:
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
                for ignore_eos, rep in ((True, 1.0), (True, 1.3), (False, 1.0)):
                    new, margin = greedy(model, ids, ignore_eos, rep)
                    result["cases"].append({"model": name, "prompt": prompt, "prompt_ids": ids,
                                            "ignore_eos": ignore_eos, "repetition_penalty": rep,
                                            "max_new_tokens": N_NEW, "tokens": new, "min_margin": margin,
                                            "text": tok.decode(new, skip_special_tokens=True)})
                    print(f"  {prompt!r} ignore_eos={ignore_eos} rep={rep}: {len(new)} tokens, "
                          f"min margin {margin:.4g}: {tok.decode(new, skip_special_tokens=True)[:60]!r}",
                          flush=True)
        except Exception as e:  # keep going: the other models' goldens are still useful
            print(f"  FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "goldens.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {len(result['cases'])} cases", flush=True)


if __name__ == "__main__":
    main()
