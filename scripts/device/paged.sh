#!/usr/bin/env bash
# The paged KV cache on the GPU machine (docs/cuda.md "KV pages"). After run.sh has unpacked the
# bundle (or with build-device/ from run.sh's own build), from the repository root:
#     GPTQ_DEVICE_E2E=0 GPTQ_DEVICE_GPTQ=0 GPTQ_DEVICE_FAMILIES=0 bash scripts/device/run.sh  # bundle + cuda tests
#     bash scripts/device/paged.sh [BASE_GPTQ]                                                    # this
# 1. The paged kernel and model tests alone (test_cuda_kernels *Paged*, test_llama_cuda *paged* /
#    *ragged* / *batched*), then under compute-sanitizer memcheck (a row addressed through a wrong
#    page table entry is an out-of-bounds read there, not only a wrong number).
# 2. gptq serve --device cuda (scripts/device/serve_smoke.py: greedy text equal to the CPU server's,
#    pages back to 0, the plan line names the KV pool).
# 3. With BASE_GPTQ (a gptq binary built from the commit before the paged cache): compare_binaries.sh,
#    which must say SAME everywhere: one sequence's pages are taken in order, and the kernels'
#    arithmetic and order did not change, only the row addresses.
# 4. Decode speed (PAGED_BENCH=1, default): gptq bench of an 8-layer make-random Llama-2-7B shape at
#    batch 1, 16, 64 with a 512-token prompt, one JSON line each in $OUT/paged_bench.jsonl (compare
#    with the same command through BASE_GPTQ when given).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/paged_summary.txt"; }
. scripts/device/bundle_env.sh || { log "no build-device and no unpacked bundle: run run.sh first"; exit 1; }
status=0
run() {  # run NAME FILTER [memcheck]
    local name=$1 filter=$2 pre=()
    [ "${3:-}" = memcheck ] && pre=(compute-sanitizer --tool memcheck --error-exitcode 99)
    if "${pre[@]}" "$TEST_DIR/$name" --gtest_filter="$filter" > "$OUT/paged_$name.tmp" 2>&1; then
        log "${3:-run} $name $filter: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/paged_$name.tmp" | tr '\n' ' ')"
    else
        status=1; log "${3:-run} $name $filter FAILED"; grep -E 'FAILED|Failure|error|ERROR' "$OUT/paged_$name.tmp" | head -20 | tee -a "$OUT/paged_summary.txt"
    fi
    cat "$OUT/paged_$name.tmp" >> "$OUT/paged_tests.log"; rm -f "$OUT/paged_$name.tmp"
}
run test_cuda_kernels '*Paged*:*Attention*:*Rope*'
run test_llama_cuda '*paged*:*ragged*:*batched*:*reset*'
if command -v compute-sanitizer > /dev/null; then
    run test_cuda_kernels '*Paged*' memcheck
    run test_llama_cuda '*paged_pages_return*:*rand_qwen2*' memcheck
fi
if timeout 180 python3 scripts/device/serve_smoke.py "$GPTQ" > "$OUT/paged_serve_smoke.log" 2>&1; then
    log "serve smoke: $(grep -E '"(greedy|stream_equal|concurrent_equal|pages_used_after|paged_plan)' "$OUT/paged_serve_smoke.log" | tr -s ' \n' ' ' | cut -c1-400)"
else
    status=1; log "serve smoke FAILED:"; tail -8 "$OUT/paged_serve_smoke.log" | tee -a "$OUT/paged_summary.txt"
fi
if [ -n "${1:-}" ]; then
    bash scripts/device/compare_binaries.sh "$1" "$GPTQ" "$OUT/paged_compare.txt" > /dev/null 2>&1
    log "compare_binaries against $1: $(grep -c '^SAME' "$OUT/paged_compare.txt") same, $(grep -c '^DIFFER' "$OUT/paged_compare.txt") differ"
    grep -q '^DIFFER' "$OUT/paged_compare.txt" && status=1
fi
if [ "${PAGED_BENCH:-1}" = 1 ]; then
    M=/tmp/gptq-paged-l8; rm -rf "$M"
    if timeout 200 "$GPTQ" -q make-random --like llama-2-7b-layers=8 -o "$M" --threads "$(nproc)" >> "$OUT/paged_tests.log" 2>&1; then
        for bin in "$GPTQ" ${1:-}; do
            timeout 400 "$bin" -q bench "$M" --device cuda --batch 1,16,64 --prompt 512 --gen 128 --repeat 3 --json \
                2>> "$OUT/paged_tests.log" | sed "s|^{|{\"binary\":\"$bin\",|" >> "$OUT/paged_bench.jsonl"
        done
        log "bench: $(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print("%s batch %s: decode %.1f tok/s (%.2f ms/step)" % (r["binary"], r.get("batch"), r["decode_tok_per_s"], r["decode_ms_per_step"]))' "$OUT/paged_bench.jsonl" 2>&1 | tr '\n' ';')"
    else
        log "make-random FAILED (see paged_tests.log)"
    fi
fi
exit $status
