#!/usr/bin/env bash
# End-to-end speed on the CPU at real shapes: `gptq make-random` of a named shape (kept and reused
# in WORK), then `gptq bench` of it and of the bundled tiny-llama, one JSON object per
# (model, batch) row (docs/bench.md lists the fields).
#
# Usage: bench/e2e_cpu.sh [GPTQ_BINARY] [OUT_JSONL]
#   defaults: build/bin/gptq, bench-e2e-cpu.jsonl
# Environment (defaults in brackets): LIKE [llama-2-7b-layers=2], BATCH [1,4], PROMPT [64], GEN [16],
#   REPEAT [1], THREADS [0: all cores], SEED [0], WORK [/tmp/gptq-bench-models], DEVICE [cpu].
#   Writing llama-2-7b-layers=2 takes ~1.3 GB of disk and ~10 s; its bench loads ~2.7 GB (F32).
# JSON lines go to OUT_JSONL (truncated first), a table of them to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gptq=${1:-$here/build/bin/gptq}
out=${2:-bench-e2e-cpu.jsonl}
like=${LIKE:-llama-2-7b-layers=2}
work=${WORK:-/tmp/gptq-bench-models}
args=(--device "${DEVICE:-cpu}" --batch "${BATCH:-1,4}" --prompt "${PROMPT:-64}" --gen "${GEN:-16}"
      --repeat "${REPEAT:-1}" --threads "${THREADS:-0}" --seed "${SEED:-0}")
mkdir -p "$work"
model="$work/$like-seed${SEED:-0}"
if [ ! -f "$model/config.json" ]; then
    "$gptq" make-random --like "$like" -o "$model" --seed "${SEED:-0}" >&2
fi
: > "$out"
for m in "$here/models/tiny-llama" "$model"; do
    "$gptq" -q bench "$m" "${args[@]}" --json >> "$out"
done
python3 - "$out" >&2 <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("%-28s %5s %13s %12s %9s %9s %10s" % ("model", "batch", "prefill tok/s", "decode tok/s", "TTFT ms",
                                              "ms/step", "peak MiB"))
for r in rows:
    print("%-28s %5d %13.1f %12.2f %9.1f %9.2f %10.0f" % (r["model"], r["batch"], r["prefill_tok_per_s"],
          r["decode_tok_per_s"], r["ttft_ms"], r["decode_ms_per_step"], r["peak_memory_bytes"] / 2**20))
print("%s, %d threads, prompt %d, gen %d" % (rows[0]["machine"], rows[0]["threads"], rows[0]["prompt"], rows[0]["gen"]))
PY
echo "wrote $out ($(wc -l < "$out") rows)" >&2
