#!/usr/bin/env python3
"""Which peer reader loads which checkpoint, and how well: for each folder, each reader's load
(or its exact error) and its perplexity on a few windows next to `gptq ppl` on the same windows.

  /work/venv/bin/python scripts/interop/probe_readers.py DIR... [--seqlen 512] [--max-windows 4]
"""
import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--readers", default=",".join(ic.READERS))
    ap.add_argument("--gptq", default=None)
    args = ap.parse_args()
    gptq = ic.find_gptq(args.gptq)
    ids = None
    rows = []
    for folder in args.folders:
        if ids is None:
            ids = ic.dataset_ids(folder)
        try:
            ours = ic.ours_ppl(gptq, folder, args.seqlen, args.max_windows)["ppl"]
        except Exception as e:  # noqa: BLE001
            ours = ic.short_error(e)
        for reader in args.readers.split(","):
            row = {"folder": folder, "reader": reader, "ours": ours}
            try:
                model = ic.load(reader, folder)
                row["ppl"] = ic.perplexity(model, ids, args.seqlen, args.max_windows)["ppl"]
            except Exception as e:  # noqa: BLE001
                row["error"] = ic.short_error(e)
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
