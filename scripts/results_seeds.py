#!/usr/bin/env python3
"""Summary of scripts/results_seeds.sh's JSONL: per bits and config, the ppl over calibration
seeds (mean, sample standard deviation, min, max, n), dPPL / dPPL(RTN) of the mean, and the
difference to the default paired by seed (mean, sd, seeds where the config is lower), as a
Markdown table (docs/results.md). Several files are merged (a later line of the same name wins).
    python3 scripts/results_seeds.py OUT.jsonl [MORE.jsonl ...]"""
import json
import re
import statistics
import sys


def main():
    rows = [json.loads(line) for f in sys.argv[1:] for line in open(f) if line.strip()]
    ppl = {r["name"]: r["ppl"]["ppl"] for r in rows}
    fp16 = ppl["fp16"]
    runs = {}
    for name, p in ppl.items():
        m = re.fullmatch(r"w(\d)-(.+)-s(\d+)", name)
        if m:
            runs.setdefault((int(m[1]), m[2]), {})[int(m[3])] = p
    print(f"FP16 {fp16:.2f}")
    print("| bits | config | seeds | mean ppl | std | min | max | dPPL(mean) / dPPL(RTN) | paired vs default: mean, sd; lower in |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits in (4, 3, 2, 8):
        rtn = ppl.get(f"rtn-w{bits}")
        if rtn is not None:
            print(f"| {bits} | RTN | - | {rtn:.2f} | | | | 1 | |")
        base = runs.get((bits, "default"), {})
        for (b, cfg), by_seed in sorted(runs.items(), key=lambda kv: (kv[0][1] != "default", kv[0][1])):
            if b != bits:
                continue
            v = list(by_seed.values())
            mean = statistics.mean(v)
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            ratio = (mean - fp16) / (rtn - fp16) if rtn else float("nan")
            paired = ""
            common = sorted(set(by_seed) & set(base))
            if cfg != "default" and common:
                d = [by_seed[s] - base[s] for s in common]
                dsd = statistics.stdev(d) if len(d) > 1 else float("nan")
                paired = f"{statistics.mean(d):+.2f}, {dsd:.2f}; {sum(x < 0 for x in d)} of {len(d)}"
            print(f"| {bits} | {cfg} | {len(v)} | {mean:.2f} | {sd:.2f} | {min(v):.2f} | {max(v):.2f} | {ratio:.2f} | {paired} |")


if __name__ == "__main__":
    main()
