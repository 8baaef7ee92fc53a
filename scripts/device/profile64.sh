#!/usr/bin/env bash
# Where a batch-64 decode step's time goes (issue 17's serving numbers, issue 18's profile), after
# run.sh has built or unpacked gptq: make-random Llama-2-7B cut to PROFILE_LAYERS (default 8) layers,
# RTN W4 g128, then `gptq bench --profile-ops` at batch PROFILE_BATCH (default 64; prompt 512, gen
# 32) for W4 and its FP16 original on cuda. Output: $OUT/profile64.txt (the op tables), JSON rows in
# $OUT/profile64.jsonl.
#     bash scripts/device/profile64.sh
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
. scripts/device/bundle_env.sh || { echo "profile64: run run.sh first (no build-device, no unpacked bundle)"; exit 1; }
L=${PROFILE_LAYERS:-8}
W=/tmp/gptq-profile64; rm -rf "$W"; mkdir -p "$W"
timeout 200 "$GPTQ" -q make-random --like "llama-2-7b-layers=$L" -o "$W/f16" --threads "$(nproc)" > /dev/null &&
    timeout 200 "$GPTQ" -q quantize "$W/f16" -o "$W/w4" --method rtn --bits 4 --group-size 128 --threads "$(nproc)" > /dev/null ||
    { echo "profile64: make-random or quantize failed" | tee -a "$OUT/profile64.txt"; exit 1; }
for w in w4 f16; do
    echo "== $w, $L layers, batch ${PROFILE_BATCH:-64}" >> "$OUT/profile64.txt"
    timeout 200 "$GPTQ" bench "$W/$w" --device cuda --batch "${PROFILE_BATCH:-64}" --prompt 512 --gen 32 \
        --profile-ops >> "$OUT/profile64.txt" 2>&1
    timeout 200 "$GPTQ" -q bench "$W/$w" --device cuda --batch "${PROFILE_BATCH:-64}" --prompt 512 --gen 32 --json \
        >> "$OUT/profile64.jsonl" 2>> "$OUT/profile64.txt"
done
rm -rf "$W"
