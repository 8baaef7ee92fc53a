#!/usr/bin/env bash
# One device call when machines are scarce: the focused tests first (FOCUS_TESTS: "binary:gtest-filter"
# pairs), then scripts/device/decode_quick.sh with the caller's QUICK_* settings (skipped when
# FOCUS_QUICK=0), then, while FOCUS_BUDGET_S (540) seconds have not passed, the full CUDA test binaries
# (FOCUS_FULL=1). Results: $OUT/focus.txt (one line per test binary), focus_tests.log, decode_quick.*.
#   run(command="bash scripts/device/focus.sh", carry=[".device-bundle"])
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
. scripts/device/bundle_env.sh || { echo "focus: no bundle" | tee -a "$OUT/focus.txt"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$OUT/focus.txt"
run_test() {  # binary, filter, seconds
    local name=$1 filter=$2 secs=$3
    if timeout "$secs" "$TEST_DIR/$name" --gtest_filter="$filter" > "$OUT/t.tmp" 2>&1; then
        echo "$name [$filter]: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/t.tmp" | tr '\n' ' ')" | tee -a "$OUT/focus.txt"
    else
        echo "$name [$filter] FAILED (rc $?)" | tee -a "$OUT/focus.txt"
        grep -E 'FAILED|Failure|error' "$OUT/t.tmp" | head -20 | tee -a "$OUT/focus.txt"
    fi
    cat "$OUT/t.tmp" >> "$OUT/focus_tests.log"; rm -f "$OUT/t.tmp"
}
for pair in ${FOCUS_TESTS:-}; do run_test "${pair%%:*}" "${pair#*:}" 200; done
if [ "${FOCUS_QUICK:-1}" = 1 ]; then
    timeout $(( ${FOCUS_BUDGET_S:-540} - SECONDS > 30 ? ${FOCUS_BUDGET_S:-540} - SECONDS : 30 )) \
        bash scripts/device/decode_quick.sh > /dev/null 2>&1
    cat "$OUT/decode_quick.txt" 2>/dev/null
fi
if [ "${FOCUS_FULL:-0}" = 1 ]; then
    for name in test_cuda_kernels test_cuda_gptq test_cuda_gemm test_ops_cuda test_gptq_cuda test_llama_cuda test_offload_cuda \
        test_lora_cuda test_moe_cuda test_finetune_cuda; do
        left=$(( ${FOCUS_BUDGET_S:-540} - SECONDS ))
        [ $left -gt 20 ] || { echo "no time left for $name" | tee -a "$OUT/focus.txt"; continue; }
        run_test "$name" "*" "$left"
    done
fi
echo "focus: ${SECONDS} s" | tee -a "$OUT/focus.txt"
