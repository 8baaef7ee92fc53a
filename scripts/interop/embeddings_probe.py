#!/usr/bin/env python3
"""Quantized input embeddings (issue 20 item 2; docs/quantize.md "Quantized embeddings"): which
GPTQ reader takes them? GPTQModel 7.6 can write them (`quantize(..., embed_quant_mode=
QuantizeEmbed.INPUT)`); this quantizes a cut, untied tiny-llama (make_fixtures.make_base) so,
prints the tensors and config GPTQModel wrote for model.embed_tokens, then loads the folder with
each reader (transformers + optimum, GPTQModel.load, our `gptq ppl`) and reports its ppl on the
first windows, or its exact error. With GPTQModel 7.6 on the CPU the quantize step itself fails
in its input capture (meta tensors; docs/quantize.md "Quantized embeddings"): the layout its
reader takes is checked with a hand-made file instead (embeddings_handmade.py).

  GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 /work/venv/bin/python scripts/interop/embeddings_probe.py \\
      --work /tmp/embed-probe [--bits 4 --group-size 128]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402
import make_fixtures as mf  # noqa: E402


def produce(base, out, bits, group_size):
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import QuantizeEmbed

    qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True)
    cwd = os.getcwd()
    os.chdir(os.path.dirname(out))  # GPTQModel writes a logs/ folder into the working directory
    try:
        model = GPTQModel.load(base, qcfg, device="cpu", dtype=torch.float16, attn_implementation="eager")
        model.quantize(mf.calibration_paragraphs(), batch_size=1, embed_quant_mode=QuantizeEmbed.INPUT)
        model.save(out)
    finally:
        os.chdir(cwd)


def describe(folder):
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as h:
                for k in h.keys():
                    if k.startswith("model.embed_tokens") or k.startswith("lm_head"):
                        t = h.get_slice(k)
                        out[k] = {"dtype": t.get_dtype(), "shape": list(t.get_shape())}
    q = ic.gptq_settings(folder)
    return {"tensors": out, "quantization_config": q,
            "tie_word_embeddings": ic.read_json(os.path.join(folder, "config.json")).get("tie_word_embeddings")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--gptq", default=None)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    base = os.path.join(args.work, "base")
    out = os.path.join(args.work, f"gptqmodel-embed-w{args.bits}-g{args.group_size}")
    if not os.path.isfile(os.path.join(base, "config.json")):
        os.makedirs(base, exist_ok=True)
        mf.make_base(base, untied=True)
    if not os.path.isfile(os.path.join(out, "config.json")):
        produce(base, out, args.bits, args.group_size)
    result = {"versions": ic.versions(), "folder": out, "written": describe(out), "readers": {}}
    print(json.dumps(result["written"], indent=1), flush=True)
    ids = ic.dataset_ids(out)
    for reader in ("transformers", "gptqmodel"):
        row = {}
        try:
            model = ic.load(reader, out)
            emb = model.get_input_embeddings()
            row["embedding_module"] = type(emb).__name__
            row["ppl"] = ic.perplexity(model, ids, 512, args.max_windows)["ppl"]
        except Exception as e:  # noqa: BLE001 - a refusal is a result
            row["error"] = ic.short_error(e)
            traceback.print_exc()
        result["readers"][reader] = row
        print(reader, json.dumps(row), flush=True)
    try:
        result["readers"]["ours"] = {"ppl": ic.ours_ppl(ic.find_gptq(args.gptq), out, 512, args.max_windows)["ppl"]}
    except Exception as e:  # noqa: BLE001
        result["readers"]["ours"] = {"error": ic.short_error(e)[-400:]}
    print("ours", json.dumps(result["readers"]["ours"]), flush=True)
    with open(os.path.join(args.work, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
