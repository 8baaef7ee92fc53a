#!/usr/bin/env bash
# Mixture of experts on the device machine (issue 19; docs/architectures.md "Mixture of experts").
# The GPU has no MoE block yet, so this checks the refusal and measures the CPU quantizer on the
# issue's shape:
#  1. make-random micro-mixtral; `gptq generate --device cuda` and `gptq quantize --device cuda` must
#     exit non-zero naming the family and "moe" (STATUS_UNSUPPORTED, no crash).
#  2. make-random qwen3-30b-a3b-layers=$MOE_LAYERS (default 2); `gptq quantize` on the CPU (all
#     cores) with $MOE_NSAMPLES x $MOE_SEQLEN calibration (default 128 x 2048): wall time, peak RSS
#     (/usr/bin/time -v) and the per-layer expert coverage lines, into $OUT/moe.txt.
# Run from the repository root after run.sh has built or unpacked gptq:  GPTQ=path/to/gptq bash scripts/device/moe.sh
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
GPTQ=${GPTQ:-$( [ -x build-device/bin/gptq ] && echo build-device/bin/gptq || echo /tmp/gptq-device-bundle/bin/gptq )}
LOG=$OUT/moe.txt
log() { echo "== $*" | tee -a "$LOG"; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

"$GPTQ" make-random --like micro-mixtral -o "$W/mx" > /dev/null || { log "make-random micro-mixtral failed"; exit 1; }
for cmd in "generate $W/mx --device cuda -p hello -n 4" "quantize $W/mx -o $W/mxq --device cuda --group-size 32"; do
    msg=$("$GPTQ" $cmd 2>&1); rc=$?
    if [ $rc -ne 0 ] && echo "$msg" | grep -q "mixtral uses moe"; then
        log "refused as expected (rc $rc): gptq ${cmd%% *}: $(echo "$msg" | grep -m1 'uses moe')"
    else
        log "FAIL: gptq ${cmd%% *} --device cuda on a MoE model: rc $rc: $msg"
    fi
done

like=qwen3-30b-a3b-layers=${MOE_LAYERS:-2}
"$GPTQ" make-random --like "$like" -o "$W/q3" > /dev/null || { log "make-random $like failed"; exit 1; }
log "quantize $like on the CPU ($(nproc) cores), ${MOE_NSAMPLES:-128} x ${MOE_SEQLEN:-2048} calibration"
TIME=(); [ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)  # peak RSS when GNU time is there
start=$(date +%s)
"${TIME[@]}" "$GPTQ" quantize "$W/q3" -o "$W/q3q" --nsamples "${MOE_NSAMPLES:-128}" --seqlen "${MOE_SEQLEN:-2048}" \
    --report "$OUT/moe_report.json" > "$W/q.log" 2>&1
rc=$?
log "wall $(( $(date +%s) - start )) s"
grep -E "memory plan|tokens per expert|saw fewer|^wrote|^time|Elapsed|Maximum resident" "$W/q.log" | tee -a "$LOG"
log "quantize rc $rc"
