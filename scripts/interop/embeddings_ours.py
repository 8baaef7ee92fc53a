#!/usr/bin/env python3
"""Our `gptq quantize --quantize-embeddings` checkpoints in GPTQModel (docs/quantize.md "Quantized
embeddings"): the sibling of embeddings_handmade.py, whose hand-made tensors are replaced by what
our writer produces. Each checkpoint is read by GPTQModel.load (torch kernel, F16) and by
`gptq ppl`, on the same WikiText-2 windows of 512; the rows must agree within F16 rounding.
transformers + optimum is tried too (expected: silently wrong or refused, as for the hand-made
files).

Checkpoints (tiny-llama, 4 layers, tied lm_head; and the untied 2-layer cut of
make_fixtures.make_base): W4 g128 layers with the table at 8 bits (a `dynamic` rule) or 4 bits (no
rule), gptq and gptq_v2 zero formats, and with --quantize-lm-head (its own GPTQ head, untied).

  GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 /work/venv/bin/python scripts/interop/embeddings_ours.py \
      --work /tmp/embed-ours [--gptq build-cpu/bin/gptq] [--max-windows 8]
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
import make_fixtures as mf  # noqa: E402

CASES = [  # (name, model: "tiny" or "cut", extra quantize flags)
    ("tiny-e8", "tiny", ["--embed-bits", "8"]),
    ("tiny-e4", "tiny", ["--embed-bits", "4"]),
    ("tiny-e4-v2", "tiny", ["--embed-bits", "4", "--format", "gptq_v2"]),
    ("tiny-e4-lmhead", "tiny", ["--embed-bits", "4", "--quantize-lm-head"]),
    ("cut-untied-e8", "cut", ["--embed-bits", "8"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--gptq", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated subset of the case names")
    args = ap.parse_args()
    gptq = ic.find_gptq(args.gptq)
    os.makedirs(args.work, exist_ok=True)
    cut = os.path.join(args.work, "cut-base")
    if not os.path.isdir(cut):
        os.makedirs(cut)
        mf.make_base(cut, untied=True)
    models = {"tiny": mf.BASE, "cut": cut}
    result = {"versions": ic.versions(), "max_windows": args.max_windows, "cases": {}}
    wanted = set(args.cases.split(",")) if args.cases else None
    ids = None
    for name, model, flags in CASES:
        if wanted and name not in wanted:
            continue
        out = os.path.join(args.work, name)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [gptq, "-q", "quantize", models[model], "-o", out, "--nsamples", "16", "--seqlen", "512",
               "--quantize-embeddings", "--embed-clip", "frequency"] + flags
        subprocess.run(cmd, check=True)
        if ids is None:
            ids = ic.dataset_ids(out)
        cfg = ic.read_json(os.path.join(out, "config.json"))
        row = {"flags": " ".join(cmd[3:]), "tie_word_embeddings": cfg.get("tie_word_embeddings"),
               "dynamic": cfg["quantization_config"].get("dynamic"), "readers": {}}
        try:
            row["readers"]["ours"] = {"ppl": ic.ours_ppl(gptq, out, 512, args.max_windows)["ppl"]}
        except Exception as e:  # noqa: BLE001
            row["readers"]["ours"] = {"error": ic.short_error(e)[-300:]}
        for reader in ("gptqmodel", "transformers"):
            r = {}
            try:
                m = ic.load(reader, out)
                r["embedding_module"] = type(m.get_input_embeddings()).__name__
                r["lm_head_module"] = type(m.get_output_embeddings()).__name__
                r["ppl"] = ic.perplexity(m, ids, 512, args.max_windows)["ppl"]
                del m
            except Exception as e:  # noqa: BLE001 - a refusal is a result
                r["error"] = ic.short_error(e)
                traceback.print_exc()
            row["readers"][reader] = r
        ours = row["readers"]["ours"].get("ppl")
        for reader in ("gptqmodel", "transformers"):
            p = row["readers"][reader].get("ppl")
            if ours and p:
                row["readers"][reader]["relative_to_ours"] = p / ours - 1.0
        result["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    with open(os.path.join(args.work, "result-embeddings-ours.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
