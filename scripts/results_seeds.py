#!/usr/bin/env python3
"""Summary of scripts/results_seeds.sh's JSONL: per bits and config, the ppl over calibration
seeds (mean, sample standard deviation, min, max, n) and dPPL / dPPL(RTN) of the mean, as a
Markdown table (docs/results.md).   python3 scripts/results_seeds.py OUT.jsonl"""
import json
import re
import statistics
import sys


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    ppl = {r["name"]: r["ppl"]["ppl"] for r in rows}
    fp16 = ppl["fp16"]
    runs = {}
    for name, p in ppl.items():
        m = re.fullmatch(r"w(\d)-(.+)-s(\d+)", name)
        if m:
            runs.setdefault((int(m[1]), m[2]), []).append(p)
    print(f"FP16 {fp16:.2f}")
    print("| bits | config | seeds | mean ppl | std | min | max | dPPL(mean) / dPPL(RTN) |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in (4, 3):
        rtn = ppl.get(f"rtn-w{bits}")
        if rtn is not None:
            print(f"| {bits} | RTN | - | {rtn:.2f} | | | | 1 |")
        for (b, cfg), v in sorted(runs.items(), key=lambda kv: (kv[0][0] != bits, kv[0][1] != "default", kv[0][1])):
            if b != bits:
                continue
            mean = statistics.mean(v)
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            ratio = (mean - fp16) / (rtn - fp16) if rtn else float("nan")
            print(f"| {bits} | {cfg} | {len(v)} | {mean:.2f} | {sd:.2f} | {min(v):.2f} | {max(v):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
