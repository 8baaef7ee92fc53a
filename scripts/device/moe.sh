#!/usr/bin/env bash
# Mixture of experts on the device machine (issue 19; docs/architectures.md "Mixture of experts",
# docs/cuda.md "Mixture of experts"). Steps (each logs one or more lines to $OUT/moe.txt):
#  1. test_moe_cuda (the MoE ops against references, the MoE models on the GPU against the CPU),
#     when the binary is found next to gptq or in build-device/tests ($MOE_TEST overrides).
#  2. make-random micro-mixtral: `gptq generate --device cuda` runs (greedy text compared with the
#     CPU's, informational); `gptq quantize --device cuda` runs (GPTQ of the experts on the GPU).
#  3. Bench (MOE_BENCH=0 skips): make-random qwen3-30b-a3b cut to $MOE_BENCH_LAYERS layers (default 8;
#     the F16 lm_head, 151936 x 2048, is as large as 4 layers' active weights: more layers, truer ratio),
#     RTN W4 g128 on the host's cores, `gptq bench` W4 against its FP16 original on cuda at batch 1
#     and 16 (prompt 512, gen 128): JSON lines to $OUT/moe_bench.jsonl, one line per row to moe.txt;
#     the W4 op profile at batch 1 to $OUT/moe_profile.txt.
#  4. GPTQ of the issue's shape on the GPU (MOE_GPU_QUANTIZE=0 skips): make-random
#     qwen3-30b-a3b-layers=$MOE_LAYERS (default 2), `gptq quantize --device cuda` with
#     $MOE_NSAMPLES x $MOE_SEQLEN calibration (default 128 x 2048): wall time, peak RSS, the GPU
#     memory plan and the per-layer expert coverage lines (x 48 / MOE_LAYERS for the whole model).
#     MOE_CPU_QUANTIZE=1: the same on the CPU (all cores; long).
# Run from the repository root after run.sh has built or unpacked gptq:
#     GPTQ=path/to/gptq bash scripts/device/moe.sh
# Tests and the small checks only (about a minute): MOE_BENCH=0 MOE_GPU_QUANTIZE=0.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
GPTQ=${GPTQ:-$( [ -x build-device/bin/gptq ] && echo build-device/bin/gptq || echo /tmp/gptq-device-bundle/bin/gptq )}
LOG=$OUT/moe.txt
log() { echo "== $*" | tee -a "$LOG"; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
status=0
export GPTQ_TEST_SOURCE_DIR=${GPTQ_TEST_SOURCE_DIR:-$PWD}  # the tests' models and data: this checkout

# ---- 1. the tests -----------------------------------------------------------------------------------
T=${MOE_TEST:-}
[ -z "$T" ] && for c in "$(dirname "$GPTQ")/test_moe_cuda" build-device/tests/test_moe_cuda; do
    [ -x "$c" ] && T=$c && break
done
if [ -n "$T" ]; then
    if "$T" > "$OUT/test_moe_cuda.log" 2>&1; then
        log "test_moe_cuda: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/test_moe_cuda.log" | tr '\n' ' ')"
    else
        status=1; log "test_moe_cuda FAILED (see test_moe_cuda.log)"
        grep -E '^\[  FAILED|Failure|error' "$OUT/test_moe_cuda.log" | head -30 | tee -a "$LOG"
    fi
else
    log "test_moe_cuda not found (build it: cmake --build build-device --target test_moe_cuda)"
fi

# ---- 2. generate on the GPU, quantize --device cuda refused --------------------------------------------
"$GPTQ" -q make-random --like micro-mixtral -o "$W/mx" > /dev/null || { log "make-random micro-mixtral failed"; exit 1; }
gen_cpu=$("$GPTQ" -q generate "$W/mx" --device cpu -p hello -n 16 --temperature 0 2>&1); rc_cpu=$?
gen_gpu=$("$GPTQ" -q generate "$W/mx" --device cuda -p hello -n 16 --temperature 0 2>&1); rc_gpu=$?
if [ $rc_gpu -eq 0 ]; then
    same=$([ "$gen_cpu" = "$gen_gpu" ] && echo same || echo different)
    log "generate micro-mixtral --device cuda: ok (greedy text $same as the CPU's; informational)"
else
    status=1; log "FAIL: generate micro-mixtral --device cuda rc $rc_gpu: $gen_gpu"
fi
[ $rc_cpu -eq 0 ] || log "generate micro-mixtral --device cpu rc $rc_cpu: $gen_cpu"
msg=$("$GPTQ" quantize "$W/mx" -o "$W/mxq" --device cuda --group-size 32 --nsamples 8 --seqlen 64 2>&1); rc=$?
if [ $rc -eq 0 ]; then
    log "quantize micro-mixtral --device cuda: ok ($(echo "$msg" | grep -m1 '^wrote'))"
else
    status=1; log "FAIL: quantize micro-mixtral --device cuda rc $rc: $(echo "$msg" | tail -3)"
fi

# ---- 3. bench: qwen3-30b-a3b cut to a few layers, W4 vs FP16, batch 1 and 16 ---------------------------
if [ "${MOE_BENCH:-1}" = 1 ]; then
    shape=qwen3-30b-a3b-layers=${MOE_BENCH_LAYERS:-8}
    if timeout 300 "$GPTQ" -q make-random --like "$shape" -o "$W/b16" --threads "$(nproc)" >> "$LOG.detail" 2>&1 &&
       timeout 400 "$GPTQ" -q quantize "$W/b16" -o "$W/bw4" --method rtn --bits 4 --group-size 128 \
           --threads "$(nproc)" >> "$LOG.detail" 2>&1 &&
       timeout 500 "$GPTQ" -q bench "$W/bw4" --compare-fp16 "$W/b16" --device cuda --batch 1,16 \
           --prompt 512 --gen 128 --json > "$W/bench.jsonl" 2>> "$LOG.detail"; then
        sed "s/^{/{\"family\":\"$shape\",/" "$W/bench.jsonl" >> "$OUT/moe_bench.jsonl"
        python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print("bench %s %s %s batch %s: decode %.1f tok/s (%.3f ms/step), prefill %.0f tok/s, peak %s" % (sys.argv[2],
          r.get("role"), r.get("weights"), r.get("batch"), r.get("decode_tok_per_s", 0), r.get("decode_ms_per_step", 0),
          r.get("prefill_tok_per_s", 0), r.get("peak_memory_bytes", r.get("peak_bytes", "?"))))' "$W/bench.jsonl" "$shape" \
            2>&1 | while read -r line; do log "$line"; done
        # Where a W4 decode step goes at batch 1 (op timing: uncaptured steps, the graph's kernels).
        timeout 300 "$GPTQ" -q bench "$W/bw4" --device cuda --batch 1 --prompt 512 --gen 32 --profile-ops \
            > "$OUT/moe_profile.txt" 2>&1 || log "bench --profile-ops failed (moe_profile.txt)"
    else
        status=1; log "bench $shape make-random/quantize/bench FAILED (see moe.txt.detail)"; tail -5 "$LOG.detail"
    fi
    rm -rf "$W/b16" "$W/bw4"
fi

# ---- 4. GPTQ of the issue's shape on the GPU (and with MOE_CPU_QUANTIZE=1 on the CPU) ------------------------
devices=()
[ "${MOE_GPU_QUANTIZE:-1}" = 1 ] && devices+=(cuda)
[ "${MOE_CPU_QUANTIZE:-0}" = 1 ] && devices+=(cpu)
if [ ${#devices[@]} -gt 0 ]; then
    like=qwen3-30b-a3b-layers=${MOE_LAYERS:-2}
    "$GPTQ" -q make-random --like "$like" -o "$W/q3" > /dev/null || { log "make-random $like failed"; exit 1; }
    for dev in "${devices[@]}"; do
        log "quantize $like --device $dev ($(nproc) cores), ${MOE_NSAMPLES:-128} x ${MOE_SEQLEN:-2048} calibration"
        TIME=(); [ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)  # peak RSS when GNU time is there
        start=$(date +%s)
        rm -rf "$W/q3q"
        timeout "${MOE_QUANTIZE_TIMEOUT:-1200}" "${TIME[@]}" "$GPTQ" quantize "$W/q3" -o "$W/q3q" --device "$dev" \
            --nsamples "${MOE_NSAMPLES:-128}" --seqlen "${MOE_SEQLEN:-2048}" --report "$OUT/moe_report_$dev.json" \
            > "$W/q.log" 2>&1
        rc=$?
        log "wall $(( $(date +%s) - start )) s"
        grep -E "memory plan|tokens per expert|saw fewer|^wrote|^time|Elapsed|Maximum resident" "$W/q.log" | tee -a "$LOG"
        [ $rc -eq 0 ] || { status=1; tail -5 "$W/q.log" | tee -a "$LOG"; }
        log "quantize --device $dev rc $rc"
    done
fi
exit $status
