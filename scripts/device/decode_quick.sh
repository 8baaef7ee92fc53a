#!/usr/bin/env bash
# A few minutes of device time: the decode step's options A/B on an 8-layer Llama-2-7B shape, RTN W4 g128
# (issue 18). Unpacks the carried bundle if run.sh has not (DEVICE_BUNDLE, default .device-bundle), then
# one `gptq bench` per setting (defaults; GPTQ_DECODE_FUSE=0; GPTQ_DECODE_FUSE_GEMV=1;
# GPTQ_INT4_PREFETCH=1) at batch QUICK_BATCH (default 1,16), prompt 512, gen 64, repeat 2. Output:
# $OUT/decode_quick.txt (one line per setting and batch), JSON rows in $OUT/decode_quick.jsonl.
# QUICK_LAYERS (8; 32 = the whole 7B), QUICK_PROMPT (512), QUICK_SETTINGS (space-separated; a setting of several variables
# joins them with commas: "GPTQ_INT4_PREFETCH=1,GPTQ_DECODE_FUSE=0"), QUICK_FP16=1 adds the FP16 model,
# QUICK_LM_HEAD=1 a W4 copy with --quantize-lm-head, QUICK_LIKE another shape (llama-3-8b: 128k vocabulary), QUICK_DESC_ACT=1 a GPTQ --desc-act copy
# (8 x 512 calibration tokens on the GPU: only its layout matters for speed).
#     run(command="bash scripts/device/decode_quick.sh", carry=[".device-bundle"])
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
. scripts/device/bundle_env.sh || { echo "decode_quick: no build-device and no bundle" | tee -a "$OUT/decode_quick.txt"; exit 1; }
W=/tmp/gptq-decode-quick; rm -rf "$W"; mkdir -p "$W"
timeout 200 "$GPTQ" -q make-random --like "${QUICK_LIKE:-llama-2-7b}-layers=${QUICK_LAYERS:-8}" -o "$W/f16" --threads "$(nproc)" > /dev/null &&
    timeout 300 "$GPTQ" -q quantize "$W/f16" -o "$W/w4" --method rtn --bits 4 --group-size 128 --threads "$(nproc)" > /dev/null ||
    { echo "decode_quick: make-random or quantize failed" | tee -a "$OUT/decode_quick.txt"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader >> "$OUT/decode_quick.txt"
n_rows=$(echo "${QUICK_BATCH:-1,16}" | tr ',' '\n' | wc -l)
settings=${QUICK_SETTINGS:-"defaults GPTQ_DECODE_FUSE=0 GPTQ_DECODE_FUSE_GEMV=1 GPTQ_INT4_PREFETCH=1"}
[ "${QUICK_FP16:-0}" = 1 ] && settings="$settings fp16"
# QUICK_LM_HEAD_SETTINGS: the settings run on the --quantize-lm-head copy (default: lm_head alone).
if [ "${QUICK_DESC_ACT:-0}" = 1 ]; then
    timeout 300 "$GPTQ" -q quantize "$W/f16" -o "$W/w4d" --bits 4 --group-size 128 --desc-act --nsamples 8 --seqlen 512 \
        --device cuda --threads "$(nproc)" > /dev/null && settings="$settings desc_act" ||
        echo "decode_quick: quantize --desc-act failed" | tee -a "$OUT/decode_quick.txt"
fi
if [ "${QUICK_LM_HEAD:-0}" = 1 ]; then
    timeout 300 "$GPTQ" -q quantize "$W/f16" -o "$W/w4h" --method rtn --bits 4 --group-size 128 --quantize-lm-head \
        --threads "$(nproc)" > /dev/null && settings="$settings ${QUICK_LM_HEAD_SETTINGS:-lm_head}" ||
        echo "decode_quick: quantize --quantize-lm-head failed" | tee -a "$OUT/decode_quick.txt"
fi
for setting in $settings; do
    # Comma-separated parts: a model (fp16, lm_head, desc_act; default the W4 one) and VAR=VALUE settings,
    # e.g. "lm_head,GPTQ_DECODE_FUSE_EPI=1".
    envs=""; model=$W/w4
    for part in ${setting//,/ }; do
        case $part in defaults) ;; fp16) model=$W/f16 ;; lm_head) model=$W/w4h ;; desc_act) model=$W/w4d ;; *) envs="$envs $part" ;; esac
    done
    if env $envs timeout 200 "$GPTQ" -q bench "$model" --device cuda --batch "${QUICK_BATCH:-1,16}" --prompt "${QUICK_PROMPT:-512}" \
            --gen 64 --repeat 2 --json >> "$OUT/decode_quick.jsonl" 2>> "$OUT/decode_quick.txt"; then
        tail -n "$n_rows" "$OUT/decode_quick.jsonl" | SETTING="$setting" python3 -c 'import json,os,sys
for l in sys.stdin:
    r = json.loads(l); print("%-26s batch %2d: decode %7.1f tok/s, %.3f ms/step, prefill %7.0f tok/s" % (os.environ["SETTING"], r["batch"], r["decode_tok_per_s"], r["decode_ms_per_step"], r["prefill_tok_per_s"]))' \
            | tee -a "$OUT/decode_quick.txt"
    else
        echo "$setting: bench FAILED" | tee -a "$OUT/decode_quick.txt"
    fi
done
rm -rf "$W"
