#!/usr/bin/env bash
# GPTQ of the Llama-2-7B shape on one GPU, timed by phase (issue 18: <= 90 s end to end, <= 12 GB
# peak; docs/cuda.md "GPTQ on the GPU", docs/perf-notes.md). On the GPU machine, from the repository
# root, with a carried bundle (scripts/device/bundle.sh; BUNDLE_OUT=.device-bundle-gq for another
# folder):
#   run(command="DEVICE_BUNDLE=.device-bundle-gq bash scripts/device/gptq7b.sh", carry=[".device-bundle-gq"])
# 1. `gptq make-random --like llama-2-7b` (all 32 layers, F16, seed 0; random weights: the time does
#    not depend on the values).
# 2. For each mode of GPTQ7B_MODES (default "new plain"): `gptq quantize --device cuda --nsamples 128
#    --seqlen 2048 --bits 4 --group-size 128` (true-sequential, damp 0.01). Calibration: TEXT, the
#    bundled data/calib/corpus-sample.txt (tokenized, 128 windows of 2048 tokens at seeded random
#    offsets), as every earlier measurement. Mode "plain" sets GPTQ_QUANTIZE_PLAIN=1: the code
#    paths as they were before issue 18 (no reader/writer threads, W/H/Q through the host). Mode
#    "flip" (an experiment, only when named): "new" with GPTQ_CUDA_CHOLESKY_FLIP=1 (potrf + trtri
#    instead of potrf + potri + potrf; codes differ at rounding ties: compare error_gptq_sum).
#    GPU memory is sampled by nvidia-smi every 100 ms (the whole process, CUDA context included).
# 3. With both modes: the two outputs compared byte for byte (they must be identical).
# Prints one JSON line per mode ("run":"gptq7b"), also appended to $OUT/gptq7b.jsonl: total seconds
# (wall, and the report's), peak GPU memory (nvidia-smi, MiB, and the runner's own cudaMemGetInfo
# peak), the GPU memory plan, the report's phase_seconds (summed over the layers; "other" is the
# total minus the phases) and detail_seconds (parts of phases: the GPU solve's steps, the GPU time
# of the Hessian accumulation; the reader / writer threads' own time).
# Knobs: GPTQ7B_MODES, GPTQ7B_LIKE (default llama-2-7b; e.g. llama-2-7b-layers=4 for a quick run),
# GPTQ7B_ARGS (extra quantize flags), GPTQ7B_TINY=0 skips the tiny-llama new-vs-plain check run first,
# GPTQ7B_TIMEOUT (seconds per quantize, default 330).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"

DB=${DEVICE_BUNDLE:-.device-bundle}
[ -d "$DB" ] || { log "no $DB: run scripts/device/bundle.sh here and carry it"; exit 1; }
B=/tmp/gptq-device-bundle
rm -rf "$B" && mkdir -p "$B" && tar -C "$B" -xJf "$DB/bundle.tar.xz"
log "using the carried $DB (built at commit $(cat $B/COMMIT 2>/dev/null))"
# The bundle's own libraries, then the machine's cuBLAS / cuSOLVER (as bundle_env.sh; this also
# takes a BUNDLE_GPTQ_ONLY=1 bundle, which has no test binaries).
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
    d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
    [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$B/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
GPTQ=$B/bin/gptq
[ -x "$GPTQ" ] || { log "no gptq binary in the bundle"; exit 1; }
JOBS=$(nproc)
status=0

# quantize MODE MODEL OUTDIR ARGS...: one JSON line on stdout (and gptq7b.jsonl), 1 on failure.
quantize() {
    local mode=$1 model=$2 dst=$3; shift 3
    local plain=0 flip=0; [ "$mode" = plain ] && plain=1; [ "$mode" = flip ] && flip=1
    local mem="$dst.mem" log_file="$OUT/gptq7b-$(basename "$dst").log"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" 2>/dev/null &
    local smi=$!
    local t0; t0=$(date +%s.%N)
    # --calib named: the bundle's binary finds no data/ beside it on this machine.
    GPTQ_QUANTIZE_PLAIN=$plain GPTQ_CUDA_CHOLESKY_FLIP=$flip timeout "${GPTQ7B_TIMEOUT:-330}" "$GPTQ" -v quantize "$model" -o "$dst" --device cuda \
        --calib "$PWD/data/calib/corpus-sample.txt" --threads "$JOBS" --report "$dst.json" "$@" > "$log_file" 2>&1
    local rc=$?
    local secs; secs=$(echo "$(date +%s.%N) $t0" | awk '{printf "%.2f", $1 - $2}')
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    if [ $rc != 0 ]; then
        log "quantize ($mode) of $model FAILED (rc $rc; see $(basename "$log_file")):"; tail -5 "$log_file"
        return 1
    fi
    python3 - "$mode" "$secs" "$mem" "$dst.json" "$log_file" "$model" <<'EOF' | tee -a "$OUT/gptq7b.jsonl"
import json, os, re, sys
mode, secs, mem, rep, log, model = sys.argv[1:]
r = json.load(open(rep))
mib = [int(x) for x in open(mem).read().split() if x.strip().isdigit()]
ph = r.get("phase_seconds", {})
plan = ""
for line in open(log, errors="replace"):
    if "GPU memory plan" in line:
        plan = line.strip().split("GPU memory plan: ", 1)[-1]
out = {"run": "gptq7b", "model": os.environ.get("LABEL") or model.rsplit("/", 1)[-1], "mode": mode, "wall_seconds": float(secs),
       "report_seconds": round(r["seconds"], 2),
       "peak_gpu_mib_smi": max(mib) if mib else None, "gpu_mib_before": mib[0] if mib else None,
       "device_used_peak_mib": round(r.get("device_used_peak_bytes", 0) / 2**20),
       "plan_mib": round(r.get("peak_plan_bytes", 0) / 2**20),
       "n_calib_tokens": r["n_calib_tokens"],
       "phase_seconds": {k: round(v, 2) for k, v in ph.items()},
       "detail_seconds": {k: round(v, 2) for k, v in r.get("detail_seconds", {}).items()},
       "other_seconds": round(r["seconds"] - sum(ph.values()), 2), "gpu_plan": plan,
       "error_gptq_sum": sum(l["error_gptq"] for l in r["linears"]),
       "error_rtn_sum": sum(l["error_rtn"] for l in r["linears"])}
print(json.dumps(out))
EOF
}

# Byte-for-byte comparison of two output folders (every file but the report).
same_output() {
    local a=$1 b=$2 f bad=0
    for f in "$a"/*; do
        cmp -s "$f" "$b/$(basename "$f")" || { echo "differs: $(basename "$f")"; bad=1; }
    done
    return $bad
}

MODES=${GPTQ7B_MODES:-new plain}

# ---- tiny-llama first: new vs plain must give identical files (seconds) ---------------------------
if [ "${GPTQ7B_TINY:-1}" = 1 ]; then
    TQ=/tmp/gptq-q7b-tiny; rm -rf "$TQ"; mkdir -p "$TQ"
    for args in "" "--desc-act" "--no-sym --group-size 64"; do
        ok=1
        for mode in new plain; do
            quantize "$mode" models/tiny-llama "$TQ/$mode" --nsamples 32 --seqlen 256 $args > /dev/null || { ok=0; status=1; }
        done
        if [ $ok = 1 ]; then
            if d=$(same_output "$TQ/new" "$TQ/plain"); then
                log "tiny-llama ${args:-plain W4 g128}: new and plain outputs identical"
            else
                status=1; log "tiny-llama ${args:-plain W4 g128}: new vs plain outputs DIFFER: $d"
            fi
            # The errors' double sums are atomic adds on the device (order varies): 1e-9 relative.
            python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["linears"]; b=json.load(open(sys.argv[2]))["linears"]; f=lambda u,v: abs(u-v) > 1e-9*abs(u); d=[x["name"] for x,y in zip(a,b) if f(x["error_gptq"],y["error_gptq"]) or f(x["error_rtn"],y["error_rtn"])]; print("report errors (1e-9): %d of %d linears differ %s" % (len(d), len(a), d[:3]))' \
                "$TQ/new.json" "$TQ/plain.json" | tee -a "$OUT/summary.txt"
        fi
        rm -rf "$TQ"/new* "$TQ"/plain*
    done
fi

# ---- the 7B shape ----------------------------------------------------------------------------------
Q7=/tmp/gptq-q7b; rm -rf "$Q7"; mkdir -p "$Q7"
LIKE=${GPTQ7B_LIKE:-llama-2-7b}
t0=$(date +%s.%N)
if ! timeout 240 "$GPTQ" -q make-random --like "$LIKE" -o "$Q7/fp16" --threads "$JOBS" >> "$OUT/gptq7b-make.log" 2>&1; then
    log "make-random $LIKE FAILED"; tail -5 "$OUT/gptq7b-make.log"; exit 1
fi
log "make-random $LIKE: $(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}') s, $(du -sh "$Q7/fp16" | cut -f1)"
# shellcheck disable=SC2086
for mode in $MODES; do
    LABEL=$LIKE quantize "$mode" "$Q7/fp16" "$Q7/$mode" --nsamples 128 --seqlen 2048 --bits 4 --group-size 128 ${GPTQ7B_ARGS:-} \
        || status=1
    rm -f "$Q7/$mode.mem"
done
if [ -d "$Q7/new" ] && [ -d "$Q7/plain" ]; then
    if d=$(same_output "$Q7/new" "$Q7/plain"); then
        log "$LIKE: new and plain outputs identical"
    else
        status=1; log "$LIKE: new vs plain outputs DIFFER: $d"
    fi
fi
cp "$Q7"/*.json "$OUT/" 2>/dev/null
rm -rf "$Q7"
exit $status
