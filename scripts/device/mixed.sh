#!/usr/bin/env bash
# Mixed passes on the GPU machine (docs/cuda.md "Mixed passes": prompt chunks beside decode tokens in
# one forward). After run.sh has unpacked the bundle (or with build-device/ from run.sh's own build),
# from the repository root:
#     bash scripts/device/mixed.sh
# 1. The mixed-pass tests alone (test_llama_cuda, test_moe_cuda, test_lora_cuda: *mixed* and the
#    sessions' step tests), their worst errors against the separate passes ("[ mixed ]" lines),
#    then under compute-sanitizer memcheck on tiny-llama (a chunk's rows or a gather index out of
#    place is an out-of-bounds access there, not only a wrong number).
# 2. scripts/device/serve_smoke.py (greedy text equal to the CPU server's, pages back to 0).
# The serve benchmark is run.sh's section 4c (GPTQ_DEVICE_SERVE_BENCH=1 scripts/device/run.sh).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/mixed_summary.txt"; }
. scripts/device/bundle_env.sh || { log "no build-device and no unpacked bundle: run run.sh first"; exit 1; }
status=0
run() {  # run NAME FILTER [memcheck]
    local name=$1 filter=$2 pre=()
    [ "${3:-}" = memcheck ] && pre=(compute-sanitizer --tool memcheck --error-exitcode 99)
    if [ ! -x "$TEST_DIR/$name" ]; then
        status=1; log "no $TEST_DIR/$name"; return
    fi
    if "${pre[@]}" "$TEST_DIR/$name" --gtest_filter="$filter" > "$OUT/mixed_$name.tmp" 2>&1; then
        log "${3:-run} $name $filter: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/mixed_$name.tmp" | tr '\n' ' ')"
    else
        status=1; log "${3:-run} $name $filter FAILED"; grep -E 'FAILED|Failure|error|ERROR' "$OUT/mixed_$name.tmp" | head -20 | tee -a "$OUT/mixed_summary.txt"
    fi
    grep -E '^\[ mixed \]' "$OUT/mixed_$name.tmp" | tee -a "$OUT/mixed_summary.txt" > /dev/null
    cat "$OUT/mixed_$name.tmp" >> "$OUT/mixed_tests.log"; rm -f "$OUT/mixed_$name.tmp"
}
run test_llama_cuda '*mixed*:*session*'
run test_moe_cuda '*mixed*'
run test_lora_cuda '*'
if command -v compute-sanitizer > /dev/null; then
    run test_llama_cuda '*mixed_step_errors*:*profile_ops_times_mixed*' memcheck
fi
if timeout 180 python3 scripts/device/serve_smoke.py "$GPTQ" > "$OUT/mixed_serve_smoke.log" 2>&1; then
    log "serve smoke: $(grep -E '"(greedy|stream_equal|concurrent_equal|pages_used_after)' "$OUT/mixed_serve_smoke.log" | tr -s ' \n' ' ' | cut -c1-400)"
else
    status=1; log "serve smoke FAILED:"; tail -8 "$OUT/mixed_serve_smoke.log" | tee -a "$OUT/mixed_summary.txt"
fi
exit $status
