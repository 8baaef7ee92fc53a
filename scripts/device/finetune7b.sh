#!/usr/bin/env bash
# LoRA fine-tuning on the GPU (issue 21 Part 2; docs/lora.md "Fine-tuning on the GPU"). Unpacks the
# carried bundle (scripts/device/bundle.sh; DEVICE_BUNDLE, default .device-bundle) as gemm.sh does,
# or uses build-device/ when run.sh built there. Steps (each logs to $OUT/finetune.txt):
#  1. test_finetune_cuda: the training ops against the CPU's, one whole step on tiny-llama (FP16 and
#     W4 act-order) against the CPU's lora_loss_grad, resume, a GPU run against the CPU run.
#     FT_TESTS=0 skips. Then compute-sanitizer memcheck of the op tests and the FP16 step (FT_MEMCHECK=0 skips).
#  2. The loss curve: tiny-llama (FP16, and RTN W4 g32 made here; small-llama too when
#     .device-small-llama is carried) fine-tuned 4 steps of 4 x 128
#     tokens of WikiText-2 on cpu and on cuda (--gpu-math f32, tf32, bf16): each step's loss side by side
#     (JSON lines in finetune_curve.jsonl). FT_CURVE=0 skips.
#  3. The issue's shape: make-random llama-2-7b (FT_LAYERS layers, default all 32; made on the
#     device), RTN W4 g128 on the host's cores, then `gptq finetune --device cuda` of FT_STEPS
#     (default 5) steps of batch 8 x 512 tokens, r 16 on all 7 linears, WikiText-2 text, once per
#     --gpu-math in FT_MATHS (default "tf32 bf16"): a JSON line each
#     with each step's seconds, the mean after the first, the device memory (cudaMemGetInfo after the
#     last step) and nvidia-smi's peak (polled every 0.2 s) to finetune7b.jsonl. Goal: < 1 s per
#     step, < 16 GB. The models stay in /tmp/gptq-ft7b (FT_KEEP=1, the default: a second call on the
#     same warm machine reuses them). FT_7B=0 skips. Then 2 steps with --profile-ops: the GPU time per
#     op kind of each step to finetune.txt (FT_PROFILE=0 skips).
# Run from the repository root:
#   run(command="bash scripts/device/finetune7b.sh", carry=[".device-bundle"])
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
LOG=$OUT/finetune.txt
log() { echo "== $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
status=0

if [ -x build-device/bin/gptq ] && [ -x build-device/tests/test_finetune_cuda ]; then
    T=build-device/tests GPTQ=build-device/bin/gptq
else
    DB=${DEVICE_BUNDLE:-.device-bundle}
    BIN=/tmp/gptq-device-bundle
    if [ ! -x "$BIN/bin/gptq" ] || [ "${FT_UNPACK:-1}" = 1 ]; then
        [ -d "$DB" ] || { log "no $DB: run scripts/device/bundle.sh here and carry it"; exit 1; }
        rm -rf "$BIN" && mkdir -p "$BIN" && tar -C "$BIN" -xJf "$DB/bundle.tar.xz"
    fi
    log "using $BIN (built at commit $(cat $BIN/COMMIT 2>/dev/null))"
    CUDA_DIRS=""
    for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
        d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
        [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
    done
    export LD_LIBRARY_PATH=$BIN/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    T=$BIN/bin GPTQ=$BIN/bin/gptq
fi
export GPTQ_TEST_SOURCE_DIR=$PWD
JOBS=$(nproc)
W=/tmp/gptq-ft7b; mkdir -p "$W"
WIKI=data/wikitext2/wiki.test.raw

# ---- 1. the tests ----------------------------------------------------------------------------------
if [ "${FT_TESTS:-1}" = 1 ]; then
    if [ -x "$T/test_finetune_cuda" ]; then
        if "$T/test_finetune_cuda" > "$OUT/test_finetune_cuda.log" 2>&1; then
            log "test_finetune_cuda: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/test_finetune_cuda.log" | tr '\n' ' ')"
        else
            status=1; log "test_finetune_cuda FAILED (see test_finetune_cuda.log)"
            grep -E '^\[  FAILED|Failure|error|Expected|Which is|actual' "$OUT/test_finetune_cuda.log" | head -40 | tee -a "$LOG"
        fi
        grep -E 'math [a-z0-9]+: loss|train loss cpu|adapter: worst' "$OUT/test_finetune_cuda.log" | tee -a "$LOG"
    else
        status=1; log "test_finetune_cuda not found in $T (rebuild the bundle: scripts/device/bundle.sh)"
    fi
fi

# Memcheck of the op tests and one FP16 whole step (FT_MEMCHECK=0 skips; the W4 checkpoint's quantization
# would run under the sanitizer too, so only the FP16 model).
if [ "${FT_TESTS:-1}" = 1 ] && [ "${FT_MEMCHECK:-1}" = 1 ] && command -v compute-sanitizer > /dev/null && [ -x "$T/test_finetune_cuda" ]; then
    if timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 "$T/test_finetune_cuda" \
            --gtest_filter='*match_cpu*:*bit_for_bit*:*match_reference*:*each_transpose*:-*w4*:*three_steps*' > "$OUT/memcheck_finetune.log" 2>&1; then
        log "memcheck test_finetune_cuda (ops, FP16 step): clean"
    else
        status=1; log "memcheck test_finetune_cuda: ERRORS or timeout (see memcheck_finetune.log)"
        grep -E 'Invalid|ERROR SUMMARY|out of bounds|FAILED' "$OUT/memcheck_finetune.log" | head -10 | tee -a "$LOG"
    fi
fi

# ---- 2. the loss curve, cpu vs cuda ------------------------------------------------------------------
if [ "${FT_CURVE:-1}" = 1 ]; then
    : > "$OUT/finetune_curve.jsonl"
    head -c 200000 "$WIKI" > "$W/wiki-small.txt"
    TINY=models/tiny-llama
    [ -d "$W/tiny-w4" ] || "$GPTQ" -q quantize "$TINY" -o "$W/tiny-w4" --method rtn --bits 4 --group-size 32 \
        --threads "$JOBS" >> "$OUT/finetune.log" 2>&1
    MODELS=("$TINY" "$W/tiny-w4")
    if [ -d .device-small-llama ]; then  # carried (bundle.sh packs it): small-llama's curve too
        SL=/tmp/gptq-small-llama
        [ -f "$SL/config.json" ] || python3 scripts/device/byte_split.py unpack .device-small-llama "$SL"
        [ -f "$SL/config.json" ] && MODELS+=("$SL")
    fi
    for m in "${MODELS[@]}"; do
        for dev in "cpu" "cuda --gpu-math f32" "cuda" "cuda --gpu-math bf16"; do
            o=$W/curve-out; rm -rf "$o"
            if line=$(timeout 300 "$GPTQ" -q finetune "$m" --data "$W/wiki-small.txt" -o "$o" --device $dev --max-steps 4 \
                      --batch 4 --seqlen 128 --r 8 --lr 1e-3 --eval-fraction 0.02 --seed 1 -t "$JOBS" --json 2>> "$OUT/finetune.log"); then
                echo "{\"model\": \"$m\", \"device\": \"$dev\", \"result\": $line}" >> "$OUT/finetune_curve.jsonl"
                log "curve $m --device $dev: $(echo "$line" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("losses", " ".join("%.6f" % x for x in r["step_losses"]), "eval %.6f -> %.6f" % (r["eval_loss_first"], r["eval_loss"]), "%.3f s/step" % r["step_seconds_mean"])')"
            else
                status=1; log "FAIL: finetune $m --device $dev (see finetune.log)"; tail -3 "$OUT/finetune.log" | tee -a "$LOG"
            fi
        done
    done
fi

if [ "${FT_CURVE:-1}" = 1 ] && [ -f "$OUT/finetune_curve.jsonl" ]; then  # each cuda curve against the cpu one
    python3 - "$OUT/finetune_curve.jsonl" <<'PY' | tee -a "$LOG"
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for r in runs:
    if r["device"] == "cpu":
        continue
    cpu = [c for c in runs if c["model"] == r["model"] and c["device"] == "cpu"]
    if not cpu:
        continue
    a, b = r["result"]["step_losses"], cpu[-1]["result"]["step_losses"]
    d = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    e = abs(r["result"]["eval_loss"] - cpu[-1]["result"]["eval_loss"]) / abs(cpu[-1]["result"]["eval_loss"])
    print("== curve %s --device %s vs cpu: step losses within %.2e relative, final eval loss %.2e" % (r["model"], r["device"], d, e))
PY
fi

# ---- 3. the 7B shape ---------------------------------------------------------------------------------
if [ "${FT_7B:-1}" = 1 ]; then
    L=${FT_LAYERS:-32}
    like=llama-2-7b; [ "$L" != 32 ] && like="llama-2-7b-layers=$L"
    if [ ! -f "$W/l7b-w4/config.json" ] || [ "$(cat "$W/l7b-w4.like" 2>/dev/null)" != "$like" ]; then
        rm -rf "$W/l7b" "$W/l7b-w4"
        t0=$(date +%s)
        if timeout 240 "$GPTQ" -q make-random --like "$like" -o "$W/l7b" --threads "$JOBS" >> "$OUT/finetune.log" 2>&1 &&
           timeout 400 "$GPTQ" -q quantize "$W/l7b" -o "$W/l7b-w4" --method rtn --bits 4 --group-size 128 \
               --threads "$JOBS" >> "$OUT/finetune.log" 2>&1; then
            echo "$like" > "$W/l7b-w4.like"
            log "made $like RTN W4 g128 in $(( $(date +%s) - t0 )) s"
        else
            status=1; log "FAIL: make-random / quantize $like (see finetune.log)"; tail -3 "$OUT/finetune.log" | tee -a "$LOG"
        fi
        rm -rf "$W/l7b"  # the F16 original (13.5 GB) is not needed any more
    fi
    if [ -f "$W/l7b-w4/config.json" ]; then
        # 8 x 512 tokens a step: FT_STEPS steps need FT_STEPS * 8 windows (+ nothing held out).
        head -c 1200000 "$WIKI" > "$W/wiki.txt"
        for math in ${FT_MATHS:-tf32 bf16}; do
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$W/smi.txt" 2>/dev/null &
            smi=$!
            o=$W/l7b-lora; rm -rf "$o"
            line=$(timeout 400 "$GPTQ" -q finetune "$W/l7b-w4" --data "$W/wiki.txt" -o "$o" --device cuda --gpu-math "$math" \
                   --max-steps "${FT_STEPS:-5}" --batch 8 --seqlen 512 --r 16 --alpha 32 --eval-fraction 0 --json \
                   2>> "$OUT/finetune.log"); rc=$?
            kill $smi 2>/dev/null; wait $smi 2>/dev/null
            peak=$(sort -n "$W/smi.txt" | tail -1)
            if [ $rc -eq 0 ]; then
                echo "{\"model\": \"$like RTN W4 g128\", \"gpu_math\": \"$math\", \"nvidia_smi_peak_mib\": ${peak:-null}, \"result\": $line}" >> "$OUT/finetune7b.jsonl"
                log "finetune $like W4 cuda $math (8 x 512, r 16, 7 linears): $(echo "$line" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.3f s/step after the first (steps %s), loss %s, device used %.2f GB (weights %.2f, training %.2f)" % (r["step_seconds_mean"], " ".join("%.3f" % x for x in r["step_seconds"]), " ".join("%.4f" % x for x in r["step_losses"]), r.get("device_used_bytes", 0) / 1e9, r.get("device_weight_bytes", 0) / 1e9, r.get("device_train_bytes", 0) / 1e9))'), nvidia-smi peak ${peak:-?} MiB"
            else
                status=1; log "FAIL: finetune $like --device cuda --gpu-math $math rc $rc (see finetune.log)"; tail -5 "$OUT/finetune.log" | tee -a "$LOG"
            fi
        done
    fi
    # The GPU time per op kind of 2 more steps (--profile-ops: an event after each op). FT_PROFILE=0 skips.
    if [ -f "$W/l7b-w4/config.json" ] && [ "${FT_PROFILE:-1}" = 1 ]; then
        o=$W/l7b-lora-prof; rm -rf "$o"
        if timeout 300 "$GPTQ" finetune "$W/l7b-w4" --data "$W/wiki.txt" -o "$o" --device cuda --max-steps 2 --batch 8 \
               --seqlen 512 --r 16 --alpha 32 --eval-fraction 0 --gpu-math "${FT_PROFILE_MATH:-tf32}" --profile-ops --json > /dev/null 2> "$W/prof.log"; then
            grep "train profile" "$W/prof.log" | tee -a "$LOG"
        else
            status=1; log "FAIL: finetune --profile-ops"; tail -5 "$W/prof.log" | tee -a "$LOG"
        fi
    fi
    [ "${FT_KEEP:-1}" = 1 ] || rm -rf "$W"
fi
exit $status
