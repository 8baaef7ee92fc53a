#!/usr/bin/env python3
"""Part 2 of docs/interop.md "New families": GPTQModel's own quantizer on the families' small models
(WORK/<name>/ as scripts/interop/families.py prepares them), then the peers' readers and ours on
the result: each reader's logits of the family's fixed sequences (golden-<reader>.safetensors,
as families.py; test_interop_families compares ours with them), WikiText-2 ppl (seqlen 64, first --max-windows windows) of transformers (F32) and
GPTQModel.load (F16) next to `gptq ppl`, and which tensor names GPTQModel wrote.

  GPTQMODEL_CPU_WORKERS=2 /work/venv/bin/python scripts/interop/families_gptqmodel.py --work /tmp/fam
"""
import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402
import families  # noqa: E402


def quantize_gptqmodel(base, out):
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    if os.path.isfile(os.path.join(out, "quantize_config.json")):
        return
    qcfg = QuantizeConfig(bits=4, group_size=32, desc_act=False, sym=True)
    with open(os.path.join(ic.REPO, "data/wikitext2/wiki.test.raw.gptq_join.txt"), encoding="utf-8") as f:
        text = f.read()
    calib = [text[i * 400:(i + 1) * 400] for i in range(8)]
    cwd = os.getcwd()
    os.chdir(os.path.dirname(out))  # GPTQModel writes a logs/ folder into the working directory
    try:
        model = GPTQModel.load(base, qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calib, batch_size=1)
        model.save(out)
    finally:
        os.chdir(cwd)


def tensor_names(folder):
    from safetensors import safe_open

    names = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors") and not f.startswith("golden"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                names += list(st.keys())
    return sorted(names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--gptq", default=None)
    ap.add_argument("--families", default=",".join(families.FAMILIES))
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gptq = ic.find_gptq(args.gptq)
    results = {"versions": ic.versions(), "gptq": gptq, "rows": []}
    for name in args.families.split(","):
        base = families.prepare(gptq, args.work, name)
        out = os.path.join(args.work, f"{name}-gptqmodel-w4-g32")
        r = {"family": name, "folder": out}
        try:
            quantize_gptqmodel(base, out)
            r["layer0_names"] = [n for n in tensor_names(out) if ".layers.0." in n]
        except Exception as e:  # noqa: BLE001
            r["quantize_error"] = ic.short_error(e)
            traceback.print_exc()
            results["rows"].append(r)
            continue
        ids = ic.dataset_ids(base)
        try:
            r["ours"] = ic.ours_ppl(gptq, out, args.seqlen, args.max_windows)["ppl"]
        except Exception as e:  # noqa: BLE001
            r["ours_error"] = ic.short_error(e)
        golden = families.golden_of(name)
        for reader in ("transformers", "gptqmodel"):
            try:
                model = ic.load(reader, out, attn_implementation="eager")  # as families.py
                r[reader + "_seq_ppl"] = families.reader_golden(model, golden,
                                                                os.path.join(out, f"golden-{reader}.safetensors"))
                r[reader] = ic.perplexity(model, ids, args.seqlen, args.max_windows)["ppl"]
            except Exception as e:  # noqa: BLE001
                r[reader + "_error"] = ic.short_error(e)
                traceback.print_exc()
        ic.log(json.dumps({k: v for k, v in r.items() if k != "layer0_names"}))
        results["rows"].append(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
