#!/usr/bin/env bash
# LoRA on the GPU (issue 21 Part 1, docs/lora.md), on the lent machine. From the repository root:
#   bash scripts/device/lora.sh        (results under $OUT, default ./device-out)
# Reads the carried .device-bundle (scripts/device/bundle.sh builds test_lora_cuda into it; see
# scripts/device/run.sh for the layout), or DEVICE_BUNDLE=another-folder.
# 1. test_lora_cuda: the add kernel vs the CPU, GPU sessions vs CPU sessions with adapters (FP16 and
#    act-order GPTQ tiny-llama; prefill, graph decode, lockstep batch mixing adapters).
# 2. gptq generate with --lora on cuda vs cpu (greedy, 24 tokens, adapter-a and adapter-b:2; the
#    texts are compared for information only).
# 3. gptq ppl with --lora on cuda vs cpu (tiny-llama, 20 windows of 512).
# 4. gptq bench --device cuda with and without --lora (tiny-llama, batch 1 and 4): the adapters'
#    cost per decode step. One JSON line per row in lora_bench.jsonl.
# The GPU path is gated until validated: everything here runs with GPTQ_GPU_UNVALIDATED=1.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/lora_summary.txt"; }
DB=${DEVICE_BUNDLE:-.device-bundle}
[ -d "$DB" ] || { log "no $DB: run scripts/device/bundle.sh on the build machine and carry $DB"; exit 1; }
BIN=/tmp/gptq-device-bundle-lora
rm -rf "$BIN" && mkdir -p "$BIN" && tar -C "$BIN" -xJf "$DB/bundle.tar.xz"
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
    d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
    [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$BIN/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export GPTQ_TEST_SOURCE_DIR=$PWD GPTQ_GPU_UNVALIDATED=1
GPTQ=$BIN/bin/gptq
log "bundle built at commit $(cat $BIN/COMMIT 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader)"
status=0

if [ -x "$BIN/bin/test_lora_cuda" ]; then
    if "$BIN/bin/test_lora_cuda" > "$OUT/test_lora_cuda.log" 2>&1; then
        log "test_lora_cuda: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/test_lora_cuda.log" | tr '\n' ' ')"
    else
        status=1; log "test_lora_cuda FAILED"; grep -E 'FAILED|Failure|error' "$OUT/test_lora_cuda.log" | head -20
    fi
    grep '^\[ lora gpu \]' "$OUT/test_lora_cuda.log" | tee -a "$OUT/lora_summary.txt"
    if command -v compute-sanitizer > /dev/null; then
        compute-sanitizer --tool memcheck --error-exitcode 99 "$BIN/bin/test_lora_cuda" \
            --gtest_filter='*add_kernel*:*fp16_model*' > "$OUT/lora_memcheck.log" 2>&1 &&
            log "memcheck test_lora_cuda: clean" || { status=1; log "memcheck test_lora_cuda: errors (lora_memcheck.log)"; }
    fi
else
    status=1; log "no test_lora_cuda in the bundle (bundle.sh of this branch builds it)"
fi

M=models/tiny-llama
L=tests/data/lora
for lora in "$L/adapter-a" "$L/adapter-b:2"; do
    args=(generate "$M" -p "Once upon a time" -n 24 --temperature 0 --ignore-eos --lora "$lora")
    cpu=$("$GPTQ" "${args[@]}" --device cpu 2>/dev/null)
    gpu=$("$GPTQ" "${args[@]}" --device cuda 2>>"$OUT/lora_stderr.log")
    # Informational: F16 on the GPU may flip a near-tie late in a greedy text (test_lora_cuda has the bounds).
    if [ -z "$gpu" ]; then status=1; log "generate --lora $lora on cuda failed (lora_stderr.log)"
    elif [ "$cpu" = "$gpu" ]; then log "generate --lora $lora: cuda = cpu"
    else log "generate --lora $lora: cuda '$gpu' vs cpu '$cpu' (differ)"; fi
done

for dev in cpu cuda; do
    "$GPTQ" ppl "$M" --seqlen 512 --max-windows 20 --device "$dev" --json --lora "$L/adapter-a" \
        2>>"$OUT/lora_stderr.log" | tee -a "$OUT/lora_ppl.jsonl"
done
python3 - "$OUT/lora_ppl.jsonl" <<'PY' | tee -a "$OUT/lora_summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if len(rows) >= 2:
    c, g = rows[-2]["ppl"], rows[-1]["ppl"]
    print(f"ppl --lora adapter-a: cpu {c:.4f} cuda {g:.4f} rel diff {abs(g - c) / c:.2e}")
PY

for lora in "" "--lora $L/adapter-a"; do
    "$GPTQ" bench "$M" --device cuda --batch 1,4 --prompt 128 --gen 64 --repeat 3 --json $lora \
        2>>"$OUT/lora_stderr.log" | tee -a "$OUT/lora_bench.jsonl"
done
exit $status
