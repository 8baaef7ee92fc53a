#!/usr/bin/env python3
"""Goldens for `gptq generate` with DEFAULT flags (tests/data/generate/defaults.json): what
transformers' generate() produces when it is given nothing but the prompt (and a length).

transformers takes its decoding settings from the model's generation_config.json, with
GenerationConfig's defaults for absent keys (greedy unless do_sample, repetition_penalty 1, EOS
ids from the file; with no length in the file, 20 new tokens: max_length 20 + the prompt's length,
generation/utils.py "by default let's always generate 20 new tokens"); `gptq generate` must do the
same but for that length (docs/generate.md "Defaults"). For each model and prompt this records:

- "generate()": model.generate(input_ids, attention_mask) with no other argument (20 new tokens);
  gptq's default is 200 new tokens instead, so the test compares a prefix;
- "generate(max_new_tokens=200)": the same length as gptq's default: compared token for token.

and, on copies of the bundled tiny-llama whose generation_config.json sets a repetition penalty,
a list of EOS ids, max_new_tokens or max_length (the weights are linked, not copied), the default
generate() of each copy (max_new_tokens 200 unless the file sets a length). Each case keeps the
generation_config.json it used, so the test writes the same file. Also the smallest top-1/top-2
logit margin over the steps, to tell a mismatch from a near tie.

F32 on the CPU, eager attention (as scripts/device/make_generate_goldens.py). Needs torch and
transformers (5.x); run from the repository root:
    /work/venv/bin/python scripts/make_generate_default_goldens.py [--small ../shared/models/small-llama]
"""
import argparse
import json
import os
import shutil
import tempfile

import torch

PROMPTS = ["The history of the city", "Once upon a time, there was a", "def fibonacci(n):"]
N_DEFAULT = 200  # gptq generate's -n when generation_config.json sets no length

# generation_config.json variants of the bundled tiny-llama (on top of its own keys).
VARIANTS = {
    "repetition-penalty": {"repetition_penalty": 1.3},
    "eos-list": {"eos_token_id": [2, 746]},  # 746 is the 3rd greedy token after "The history of the city"
    "max-new-tokens": {"max_new_tokens": 10},
    "max-length": {"max_length": 12},
    "sampling-keys-without-do-sample": {"temperature": 0.6, "top_p": 0.9, "top_k": 5},  # greedy all the same
}


@torch.no_grad()
def run(model, ids, **kw):
    x = torch.tensor([ids], dtype=torch.long)
    out = model.generate(x, attention_mask=torch.ones_like(x), output_scores=True, return_dict_in_generate=True, **kw)
    new = out.sequences[0, len(ids):].tolist()
    margin = float("inf")
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margin = min(margin, float(top[0] - top[1]))
    return new, margin


def cases_for(name, path, kwargs_list, gen_config_extra=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        for label, kw in kwargs_list:
            new, margin = run(model, ids, **kw)
            case = {"model": name, "call": label, "prompt": prompt, "prompt_ids": ids, "tokens": new,
                    "min_margin": margin, "text": tok.decode(new, skip_special_tokens=True)}
            if gen_config_extra is not None:
                case["generation_config"] = gen_config_extra
            out.append(case)
            print(f"  {name} {label} {prompt!r}: {len(new)} tokens, min margin {margin:.3g}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", default="../shared/models/small-llama", help="small-llama folder ('' to skip)")
    ap.add_argument("--out", default="tests/data/generate/defaults.json")
    args = ap.parse_args()
    import transformers
    torch.manual_seed(0)
    tiny = "models/tiny-llama"
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "n_default": N_DEFAULT,
              "cases": []}
    plain = [("generate()", {}), (f"generate(max_new_tokens={N_DEFAULT})", {"max_new_tokens": N_DEFAULT})]
    result["cases"] += cases_for("tiny-llama", tiny, plain)
    if args.small and os.path.isdir(args.small):
        result["cases"] += cases_for("small-llama", args.small, plain)
    base_cfg = json.load(open(os.path.join(tiny, "generation_config.json")))
    for vname, extra in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            for f in os.listdir(tiny):
                src = os.path.abspath(os.path.join(tiny, f))
                if f.endswith(".safetensors"):
                    os.symlink(src, os.path.join(d, f))
                elif f != "generation_config.json":
                    shutil.copy(src, d)
            json.dump({**base_cfg, **extra}, open(os.path.join(d, "generation_config.json"), "w"))
            sets_length = "max_new_tokens" in extra or "max_length" in extra
            kw = {} if sets_length else {"max_new_tokens": N_DEFAULT}
            label = "generate()" if sets_length else f"generate(max_new_tokens={N_DEFAULT})"
            result["cases"] += cases_for("tiny-llama+" + vname, d, [(label, kw)], extra)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {len(result['cases'])} cases to {args.out}")


if __name__ == "__main__":
    main()
