#!/usr/bin/env bash
# CPU prefill throughput of the model runtime: tokens/s of batched prefill (the forward pass that
# `gptq ppl` runs, one window at a time, logits and log-softmax included) for the bundled
# tiny-llama and, when ../shared is there, small-llama, at window lengths 128, 512 and 2048.
#
# Usage: bench/prefill_cpu.sh [GPTQ_BINARY] [OUT_JSON]
#   defaults: build/bin/gptq, bench-prefill-cpu.json. Each point runs WINDOWS windows (default 8)
#   of WikiText-2 test after one warm-up window; threads: THREADS (default: all cores).
# Output: one JSON object per line {model, seqlen, n_windows, n_tokens, seconds, tokens_per_second,
# n_threads, cpu}, also printed as a table.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gptq=${1:-$here/build/bin/gptq}
out=${2:-bench-prefill-cpu.json}
windows=${WINDOWS:-8}
threads=${THREADS:-0}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
models=("$here/models/tiny-llama")
[ -d "$here/../shared/models/small-llama" ] && models+=("$here/../shared/models/small-llama")
: > "$out"
printf "%-12s %7s %8s %10s %12s\n" model seqlen tokens seconds "tokens/s"
for m in "${models[@]}"; do
    for seqlen in 128 512 2048; do
        "$gptq" -q ppl "$m" --seqlen "$seqlen" --max-windows 1 --threads "$threads" --json > /dev/null  # warm-up
        j=$("$gptq" -q ppl "$m" --seqlen "$seqlen" --max-windows "$windows" --threads "$threads" --json)
        python3 - "$j" "$(basename "$m")" "$cpu" >> "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(json.dumps({"model": sys.argv[2], "seqlen": r["seqlen"], "n_windows": r["n_windows"],
                  "n_tokens": r["n_tokens"], "seconds": r["seconds"],
                  "tokens_per_second": r["tokens_per_second"], "n_threads": r["n_threads"],
                  "cpu": sys.argv[3]}))
PY
        tail -1 "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%-12s %7d %8d %10.2f %12.1f" % (r["model"], r["seqlen"], r["n_tokens"], r["seconds"], r["tokens_per_second"]))'
    done
done
echo "wrote $out"
