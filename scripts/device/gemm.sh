#!/usr/bin/env bash
# The int4 prefill GEMM on the GPU machine, alone (docs/cuda.md, "Prefill GEMM"): unpacks a carried
# bundle (scripts/device/bundle.sh with BUNDLE_OUT=$DEVICE_BUNDLE) as run.sh does, runs test_cuda_gemm,
# the GPTQ GEMV tests, the fused-vs-unfused GPTQ model test (its prefill of 40 tokens runs the GEMM),
# then bench_gptq_gemv: Llama-2-7B with the tile x split sweep, and 13B / 70B shapes.
#   run(command="DEVICE_BUNDLE=.device-bundle-gemm bash scripts/device/gemm.sh", carry=[".device-bundle-gemm"])
# Knobs: GEMM_TESTS=0 (bench only), GEMM_BENCH=0 (tests only), GEMM_MODELS (after 7b; default 13b,70b,
# empty: none), GEMM_SWEEP=0 (no tile x split sweep), GEMM_FILTER (test_cuda_gemm's gtest filter).
# GEMM_NCU=1: Nsight Compute on two fused launches into ncu.txt. GEMM_E2E=1: gptq bench of an 8-layer
# 7B shape, W4 vs FP16 (bench_e2e.jsonl). GEMM_GPTQ_TESTS=0 skips test_cuda_gptq.
# $OUT: summary.txt, tests.log, bench_gemm_7b.json/.txt, bench_gemm_big.json/.txt, ncu.txt.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"

DB=${DEVICE_BUNDLE:-.device-bundle}
[ -d "$DB" ] || { log "no $DB: run scripts/device/bundle.sh here and carry it"; exit 1; }
BIN=/tmp/gptq-device-bundle
rm -rf "$BIN" && mkdir -p "$BIN" && tar -C "$BIN" -xJf "$DB/bundle.tar.xz"
log "using the carried $DB (built at commit $(cat $BIN/COMMIT 2>/dev/null))"
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
    d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
    [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$BIN/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export GPTQ_TEST_SOURCE_DIR=$PWD
T=$BIN/bin
status=0

runtest() {  # runtest NAME [gtest args...]
    local name=$1; shift
    if "$T/$name" "$@" > "$OUT/t.tmp" 2>&1; then
        log "$name $*: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/t.tmp" | tr '\n' ' ')"
    else
        status=1; log "$name $* FAILED"; grep -E 'FAILED|Failure|error|gpu .* ref' "$OUT/t.tmp" | head -20 | tee -a "$OUT/summary.txt"
    fi
    cat "$OUT/t.tmp" >> "$OUT/tests.log"; rm -f "$OUT/t.tmp"
}

if [ "${GEMM_TESTS:-1}" = 1 ]; then
    runtest test_cuda_gemm --gtest_filter="${GEMM_FILTER:-*}"
    [ "${GEMM_GPTQ_TESTS:-1}" = 1 ] && runtest test_cuda_gptq
    runtest test_ops_cuda
    runtest test_llama_cuda --gtest_filter='*fused_projections*:*gptq*'
    grep -E 'fused vs unfused' "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if [ "${GEMM_BENCH:-1}" = 1 ]; then
    if timeout 110 "$T/bench_gptq_gemv" --models 7b --m "${GEMM_M_7B:-1,2,4,8,16,32,64,128,192,256,512,2048}" \
            $([ "${GEMM_SWEEP:-1}" = 1 ] && echo --sweep) --out "$OUT/bench_gemm_7b.json" 2> "$OUT/bench_gemm_7b.txt"; then
        log "bench 7b done"
    else
        status=1; log "bench 7b FAILED"
    fi
    if [ -n "${GEMM_MODELS-13b,70b}" ]; then
        if timeout 80 "$T/bench_gptq_gemv" --models "${GEMM_MODELS-13b,70b}" --m "${GEMM_M_BIG:-1,2,4,8,16,32,64,128,256,2048}" \
                --out "$OUT/bench_gemm_big.json" \
                2> "$OUT/bench_gemm_big.txt"; then
            log "bench ${GEMM_MODELS-13b,70b} done"
        else
            status=1; log "bench ${GEMM_MODELS-13b,70b} FAILED"
        fi
    fi
    grep -v '^  sweep' "$OUT/bench_gemm_7b.txt" "$OUT/bench_gemm_big.txt" 2>/dev/null
fi
# Nsight Compute on two fused launches (GEMM_NCU=1): where the time goes (stall reasons, L2/DRAM).
if [ "${GEMM_NCU:-0}" = 1 ] && command -v ncu > /dev/null; then
    for spec in qkv:64 gate_up:128; do
        timeout 45 ncu --kernel-name regex:int4_gemm_kernel --launch-skip 5 --launch-count 1 --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
            --section LaunchStats "$T/bench_gptq_gemv" --only "${spec%%:*}" --m "${spec#*:}" --iters 3 --out /dev/null \
            >> "$OUT/ncu.txt" 2>&1 || log "ncu on $spec failed (see ncu.txt)"
    done
    grep -E "int4_gemm_kernel|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)|Duration|Achieved Occupancy|Issued Warp|No Eligible|Warp Cycles Per Issued|Stall|Registers Per|Block Limit" \
        "$OUT/ncu.txt" | head -60 | tee -a "$OUT/summary.txt"
fi
# End to end (GEMM_E2E=1): an 8-layer Llama-2-7B shape, RTN W4 g128 against its FP16 original,
# gptq bench prefill of GEMM_E2E_PROMPT tokens (the prefill runs every linear at m = prompt).
if [ "${GEMM_E2E:-0}" = 1 ]; then
    E2E=/tmp/gptq-e2e; rm -rf "$E2E"; mkdir -p "$E2E"
    if timeout 100 "$T/gptq" -q make-random --like llama-2-7b-layers=8 -o "$E2E/l8" --threads "$(nproc)" >> "$OUT/tests.log" 2>&1 &&
       timeout 100 "$T/gptq" -q quantize "$E2E/l8" -o "$E2E/l8-w4" --method rtn --bits 4 --group-size 128 \
           --threads "$(nproc)" >> "$OUT/tests.log" 2>&1 &&
       timeout 100 "$T/gptq" -q bench "$E2E/l8-w4" --compare-fp16 "$E2E/l8" --device cuda --batch 1 \
           --prompt "${GEMM_E2E_PROMPT:-512}" --gen 16 --repeat 3 --json > "$OUT/bench_e2e.jsonl" 2>> "$OUT/tests.log"; then
        log "e2e 8-layer 7B W4 vs fp16, prompt ${GEMM_E2E_PROMPT:-512}: $(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print("[%s %s: prefill %.0f tok/s, ttft %.1f ms, decode %.1f tok/s]" % (r["role"], r["weights"], r["prefill_tok_per_s"], r["ttft_ms"], r["decode_tok_per_s"]), end=" ")' "$OUT/bench_e2e.jsonl" 2>&1)"
    else
        status=1; log "e2e FAILED (see tests.log)"; tail -5 "$OUT/tests.log"
    fi
    rm -rf "$E2E"
fi
cat "$OUT/summary.txt"
exit $status
