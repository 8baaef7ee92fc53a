#!/usr/bin/env python3
"""Our writer checked by the peers' own readers (issue 15 item 4; table in docs/interop.md).

Quantizes MODEL with our CLI in every configuration below (same calibration for all: the CLI's
defaults), then computes the WikiText-2 perplexity of each checkpoint with `gptq ppl --json` and
with each peer reader (interop_common.py) on the same token ids and windows (GPTQ-paper
protocol, seqlen 2048 by default), and prints reader x config -> theirs, ours, delta %.
The FP16 original is measured too (transformers alone) as a check that tokens and windows agree.

  /work/venv/bin/python scripts/interop/peers_ppl.py --model ../shared/models/small-llama \\
      --work /tmp/interop-small --json docs/results-data/interop-small-llama.json

Checkpoints already in --work are reused (delete them to re-quantize). Runs on the CPU, or on a
GPU with --device cuda (then --dtype float16 is the usual choice; GPTQModel.load is always fp16).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

# name -> extra `gptq quantize` flags (docs/quantize.md)
CONFIGS = {
    "w4-g128": ["--bits", "4", "--group-size", "128"],
    "w4-g128-act-order": ["--bits", "4", "--group-size", "128", "--desc-act"],
    "w3-g128": ["--bits", "3", "--group-size", "128"],
    "w8-g128": ["--bits", "8", "--group-size", "128"],
    "w4-g32": ["--bits", "4", "--group-size", "32"],
    "w4-g-1": ["--bits", "4", "--group-size", "-1"],
    "w4-g128-asym": ["--bits", "4", "--group-size", "128", "--no-sym"],
    # issue 20: a quantized lm_head ("lm_head": true) and mixed precision (GPTQModel `dynamic` rules)
    "w4-g128-lm-head": ["--bits", "4", "--group-size", "128", "--quantize-lm-head"],
    "bpw-3.5": ["--bits", "4", "--group-size", "128", "--target-bpw", "3.5"],
    "bpw-3.5-groups": ["--bits", "4", "--group-size", "128", "--target-bpw", "3.5", "--bpw-group-sizes", "32", "64"],
    "bpw-3.5-lm-head": ["--bits", "4", "--group-size", "128", "--target-bpw", "3.5", "--quantize-lm-head"],
}
# The configurations of issue 20 (docs/interop.md "Mixed precision and a quantized lm_head").
ISSUE20_CONFIGS = ("w4-g128", "w4-g128-lm-head", "bpw-3.5", "bpw-3.5-groups", "bpw-3.5-lm-head")
TOLERANCE_PCT = 0.2  # issue 15: every reader's ppl equals ours within 0.2 %


def quantize(gptq, model, out, flags, threads):
    if os.path.isfile(os.path.join(out, "quantize_config.json")):
        ic.log(f"reusing {out}")
        return
    cmd = [gptq, "quantize", model, "-o", out] + flags + ["--resume"] * os.path.isdir(out + ".partial")
    if threads:
        cmd += ["--threads", str(threads)]
    ic.log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def checkpoint_format(folder):
    q = ic.gptq_settings(folder)
    return q.get("checkpoint_format", q.get("format", "gptq"))


def reader_windows(reader, args):
    if reader == "gptqmodel" and args.gptqmodel_max_windows is not None:
        return args.gptqmodel_max_windows
    return args.max_windows


def run_reader(reader, folder, ids, args):
    row = {"reader": reader, "max_windows": reader_windows(reader, args)}
    try:
        t0 = time.time()
        model = ic.load(reader, folder, dtype=args.torch_dtype, device=args.device)
        row["load_seconds"] = time.time() - t0
        # Before the forward: a reader that builds a module with other bits or group size than
        # the checkpoint's, or leaves a quantized lm_head dense, is named even when it then fails.
        row["modules"] = ic.check_modules(model, folder)
        row.update(ic.perplexity(model, ids, args.seqlen, row["max_windows"], device=args.device))
        del model
    except Exception as e:  # noqa: BLE001 - a reader that refuses the folder is a result
        row["error"] = ic.short_error(e)
        traceback.print_exc()
    return row


def modules_cell(row):
    m = row.get("modules")
    if m is None:
        return "-"
    return "as written" if m["ok"] else "**" + "; ".join(m["problems"])[:160] + "**"


def markdown(results):
    lines = ["| config | format | reader | windows | theirs | ours | delta % | within 0.2 % | modules |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["readers"]:
            ours = r["ours_by_windows"][str(row["max_windows"])]["ppl"]
            if "error" in row:
                lines.append(f"| {r['config']} | {r['format']} | {row['reader']} | {row['max_windows']} | "
                             f"error: {' '.join(row['error'].split())[:160]} | {ours:.4f} | - | no | {modules_cell(row)} |")
                continue
            d = 100.0 * (row["ppl"] - ours) / ours
            ok = "yes" if abs(d) <= TOLERANCE_PCT else "**no**"
            lines.append(f"| {r['config']} | {r['format']} | {row['reader']} | {row['n_windows']} | {row['ppl']:.4f} | "
                         f"{ours:.4f} | {d:+.4f} | {ok} | {modules_cell(row)} |")
    return "\n".join(lines)


def outside_tolerance(results):
    bad = []
    for r in results:
        for row in r["readers"]:
            ours = r["ours_by_windows"][str(row["max_windows"])]["ppl"]
            if "error" in row or abs(row["ppl"] - ours) > TOLERANCE_PCT / 100 * ours or \
                    not row.get("modules", {"ok": True})["ok"]:
                bad.append((r["config"], row["reader"]))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="FP16 model folder (e.g. ../shared/models/small-llama)")
    ap.add_argument("--work", required=True, help="folder for the quantized checkpoints")
    ap.add_argument("--gptq", default=None, help="our CLI (default: build*/bin/gptq or $GPTQ_BIN)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated names, or 'issue20' for {','.join(ISSUE20_CONFIGS)}")
    ap.add_argument("--readers", default=",".join(ic.READERS))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=0, help="0: all windows")
    ap.add_argument("--gptqmodel-max-windows", type=int, default=None,
                    help="fewer windows for GPTQModel.load (always float16: slow on a CPU); ours is rerun on as many")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for gptq and torch (0: all)")
    ap.add_argument("--quantize-flags", default="", help="added to every `gptq quantize` (e.g. '--nsamples 16')")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--no-fp16-check", action="store_true")
    args = ap.parse_args()
    import torch

    args.torch_dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    gptq = ic.find_gptq(args.gptq)
    os.makedirs(args.work, exist_ok=True)
    ids = ic.dataset_ids(args.model)
    results = {"versions": ic.versions(), "model": os.path.abspath(args.model), "seqlen": args.seqlen,
               "max_windows": args.max_windows, "device": args.device, "dtype": args.dtype,
               "gptq": gptq, "configs": []}

    if not args.no_fp16_check:
        ours = ic.ours_ppl(gptq, args.model, args.seqlen, args.max_windows, args.threads)
        if ours["n_dataset_tokens"] != ids.numel():
            raise SystemExit(f"token count differs: ours {ours['n_dataset_tokens']}, transformers {ids.numel()}")
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.torch_dtype, device_map=args.device).eval()
        theirs = ic.perplexity(m, ids, args.seqlen, args.max_windows, device=args.device)
        del m
        results["fp16"] = {"ours": ours, "transformers": theirs}
        ic.log(f"FP16 original: ours {ours['ppl']:.4f}, transformers {theirs['ppl']:.4f}")

    configs = ISSUE20_CONFIGS if args.configs == "issue20" else args.configs.split(",")
    for name in configs:
        folder = os.path.join(args.work, name)
        quantize(gptq, args.model, folder, CONFIGS[name] + args.quantize_flags.split(), args.threads)
        r = {"config": name, "flags": CONFIGS[name] + args.quantize_flags.split(), "format": checkpoint_format(folder),
             "ours_by_windows": {}, "readers": []}
        for reader in args.readers.split(","):
            nwin = reader_windows(reader, args)
            if str(nwin) not in r["ours_by_windows"]:
                r["ours_by_windows"][str(nwin)] = ic.ours_ppl(gptq, folder, args.seqlen, nwin, args.threads)
            row = run_reader(reader, folder, ids, args)
            r["readers"].append(row)
            ic.log(f"{name} {reader}: {row.get('ppl', row.get('error'))} "
                   f"(ours {r['ours_by_windows'][str(nwin)]['ppl']:.4f})")
        results["configs"].append(r)
        if args.json:  # after every config: a long run that stops keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(markdown(results["configs"]))
    bad = outside_tolerance(results["configs"])
    if bad:
        print(f"\noutside {TOLERANCE_PCT} % or refused: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
