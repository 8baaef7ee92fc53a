#!/usr/bin/env python3
"""The two tables of docs/interop.md, from peers_ppl.py's --json output and the fixtures'
fixture.json files (ours measured again with `gptq ppl` when --gptq is given).

  python3 scripts/interop/tables.py --peers /tmp/interop-small/results.json [--gptq build-cpu/bin/gptq]
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers_ppl  # noqa: E402
from fixture_files import assemble  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ours_on_fixture(gptq, fx):
    with tempfile.TemporaryDirectory() as d:
        assemble(fx, d)
        p = fx["protocol"]
        r = subprocess.run([gptq, "ppl", d, "--json", "--seqlen", str(p["seqlen"]), "--max-windows",
                            str(p["max_windows"])], capture_output=True, text=True)
        if r.returncode != 0:
            return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        return json.loads(r.stdout)["ppl"], None


def fixtures_table(gptq):
    lines = ["| fixture | producer | expected (reader) | transformers | gptqmodel (fp16) | autogptq | ours | delta % |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(REPO, "tests/data/interop/*/fixture.json"))):
        fx = json.load(open(path))
        cells = []
        for reader in ("transformers", "gptqmodel", "autogptq"):
            r = fx["readers"].get(reader, {})
            cells.append(f"{r['ppl']:.4f}" if "ppl" in r else "refused")
        ours, err = ours_on_fixture(gptq, fx) if gptq else (None, "not run")
        d = f"{100 * (ours - fx['expect_ppl']) / fx['expect_ppl']:+.4f}" if ours is not None else "-"
        lines.append(f"| {fx['name']} | {fx['producer']} | {fx['expect_ppl']:.4f} ({fx['expect_reader']}) | "
                     + " | ".join(cells) + f" | {f'{ours:.4f}' if ours is not None else err} | {d} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", help="peers_ppl.py --json output")
    ap.add_argument("--gptq", help="our CLI, to measure ours on the fixtures")
    args = ap.parse_args()
    if args.peers:
        res = json.load(open(args.peers))
        print(f"small-llama, seqlen {res['seqlen']}, {res['max_windows']} windows ({res['dtype']}, {res['device']})\n")
        print(peers_ppl.markdown(res["configs"]))
        print()
    print(fixtures_table(args.gptq))
    return 0


if __name__ == "__main__":
    sys.exit(main())
