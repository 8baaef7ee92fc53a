#!/usr/bin/env python3
"""Quantized input embeddings in GPTQModel's layout, made by hand (docs/quantize.md "Quantized
embeddings"): GPTQModel 7.6's writer (quantize(embed_quant_mode=INPUT)) failed here (see
embeddings_probe.py), so this writes what its reader (TorchQuantEmbeddings) expects and checks
that every reader gets it right or says why not.

The embedding table E [vocab, hidden] is stored as the GPTQ linear of E^T: in_features = vocab,
out_features = hidden, so qweight I32 [vocab * bits / 32, hidden], scales F16 [vocab / group,
hidden], qzeros I32 [vocab / group, hidden * bits / 32] (v1: zero - 1), g_idx I32 [vocab]; a
group is `group` consecutive token ids, one scale per hidden column. Symmetric RTN, 4 or 8 bits.

Folders (under --work): `q`: our `gptq quantize` (W4 g128) of a cut, untied tiny-llama with
model.embed_tokens.weight replaced by those tensors; `ref`: the same with the dequantized table
back as model.embed_tokens.weight (F16). GPTQModel.load on `q` must equal GPTQModel.load on `ref`.

  GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 /work/venv/bin/python scripts/interop/embeddings_handmade.py --work /tmp/embed-hand
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402
import make_fixtures as mf  # noqa: E402


def rtn_embedding(E, bits, group):
    """Symmetric RTN of E^T per (group of token ids, hidden column): codes, scales, zero."""
    vocab, hidden = E.shape
    W = E.float().reshape(vocab // group, group, hidden)  # [G, group, hidden]
    maxq = 2 ** bits - 1
    zero = (maxq + 1) // 2
    amax = W.abs().amax(dim=1).clamp(min=1e-8)  # [G, hidden]
    scale = (2 * amax / maxq).half().float()
    q = torch.clamp(torch.round(W / scale[:, None, :]) + zero, 0, maxq).to(torch.int64)
    deq = (scale[:, None, :] * (q - zero)).reshape(vocab, hidden)
    return q.reshape(vocab, hidden), scale, zero, deq


def to_i32(x):
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def write_folder(src, dst, tensors_update, drop):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    st = load_file(os.path.join(src, "model.safetensors"))
    for k in drop:
        del st[k]
    st.update(tensors_update)
    save_file(st, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def add_embedding_rule(folder, bits, group):
    """Unless the base config already says these bits and group size, a `dynamic` rule for
    model.embed_tokens in both config files (GPTQModel builds every module from base + rule)."""
    q = ic.read_json(os.path.join(folder, "quantize_config.json"))
    if (q["bits"], q["group_size"]) == (bits, group):
        return
    rule = {"+:^model\\.embed_tokens$": {"bits": bits, "group_size": group}}
    q["dynamic"] = {**q.get("dynamic", {}), **rule}
    with open(os.path.join(folder, "quantize_config.json"), "w") as f:
        json.dump(q, f, indent=2)
    cfg = ic.read_json(os.path.join(folder, "config.json"))
    cfg["quantization_config"] = q
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--gptq", default=None)
    args = ap.parse_args()
    gptq = ic.find_gptq(args.gptq)
    os.makedirs(args.work, exist_ok=True)
    base, layers = os.path.join(args.work, "base"), os.path.join(args.work, "w4")
    if not os.path.isdir(base):
        os.makedirs(base)
        mf.make_base(base, untied=True)
    if not os.path.isdir(layers):
        subprocess.run([gptq, "-q", "quantize", base, "-o", layers, "--nsamples", "16", "--seqlen", "512"], check=True)
    from safetensors.torch import load_file

    E = load_file(os.path.join(layers, "model.safetensors"))["model.embed_tokens.weight"]
    vocab, hidden = E.shape
    q, scale, zero, deq = rtn_embedding(E, args.bits, args.group_size)
    per = 32 // args.bits
    qweight = torch.zeros(vocab // per, hidden, dtype=torch.int64)
    for k in range(per):
        qweight |= q.reshape(vocab // per, per, hidden)[:, k, :] << (args.bits * k)
    G = vocab // args.group_size
    zcodes = torch.full((G, hidden), zero - 1, dtype=torch.int64)  # v1: zero - 1
    qzeros = torch.zeros(G, hidden // per, dtype=torch.int64)
    for k in range(per):
        qzeros |= zcodes.reshape(G, hidden // per, per)[:, :, k] << (args.bits * k)
    tensors = {
        "model.embed_tokens.qweight": to_i32(qweight),
        "model.embed_tokens.qzeros": to_i32(qzeros),
        "model.embed_tokens.scales": scale.half(),
        "model.embed_tokens.g_idx": (torch.arange(vocab) // args.group_size).to(torch.int32),
    }
    tag = f"embed-w{args.bits}-g{args.group_size}"
    qdir, rdir = os.path.join(args.work, f"q-{tag}"), os.path.join(args.work, f"ref-{tag}")
    for d in (qdir, rdir):
        shutil.rmtree(d, ignore_errors=True)
    write_folder(layers, qdir, tensors, ["model.embed_tokens.weight"])
    write_folder(layers, rdir, {"model.embed_tokens.weight": deq.half()}, [])
    add_embedding_rule(qdir, args.bits, args.group_size)
    ids = ic.dataset_ids(qdir)
    result = {"versions": ic.versions(), "bits": args.bits, "group_size": args.group_size,
              "max_windows": args.max_windows, "readers": {}}
    for name, folder in (("q", qdir), ("ref", rdir)):
        for reader in ("gptqmodel", "transformers"):
            row = {}
            try:
                model = ic.load(reader, folder)
                row["embedding_module"] = type(model.get_input_embeddings()).__name__
                row["ppl"] = ic.perplexity(model, ids, 512, args.max_windows)["ppl"]
            except Exception as e:  # noqa: BLE001 - a refusal is a result
                row["error"] = ic.short_error(e)
                traceback.print_exc()
            result["readers"][f"{name}/{reader}"] = row
            print(name, reader, json.dumps(row), flush=True)
        try:
            row = {"ppl": ic.ours_ppl(gptq, folder, 512, args.max_windows)["ppl"]}
        except Exception as e:  # noqa: BLE001
            row = {"error": ic.short_error(e)[-300:]}
        result["readers"][f"{name}/ours"] = row
        print(name, "ours", json.dumps(row), flush=True)
    with open(os.path.join(args.work, f"result-{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
