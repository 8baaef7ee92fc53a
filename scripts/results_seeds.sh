#!/usr/bin/env bash
# The defaults study over calibration seeds (docs/results.md, "Issue 20: the defaults study, five
# calibration seeds"): FP16, RTN W4/W3, then for bits 4 and 3 and seeds 0..4 every GPTQ config
# below at g128 (128 x 512 calibration windows, scripts/results_small_llama.sh's protocol), ppl
# on the first $WINDOWS WikiText-2 windows of 512. Summary: scripts/results_seeds.py OUT.jsonl
#   GPTQ_BIN=build-cpu/bin/gptq MODEL=../shared/models/tiny-llama scripts/results_seeds.sh OUT.jsonl
set -euo pipefail
out=${1:?usage: results_seeds.sh OUT.jsonl}
export THREADS=${THREADS:-1} PPL_ARGS="--max-windows ${WINDOWS:-80}"
cfgs=(fp16: rtn-w4:--method,rtn rtn-w3:--method,rtn,--bits,3)
for bits in 4 3; do
    for seed in 0 1 2 3 4; do
        for c in "default:" "mse-hessian:--mse-hessian" "gar:--gar" "desc-act:--desc-act" "damp05:--damp-percent,0.05"; do
            n=${c%%:*}; f=${c#*:}
            cfgs+=("w$bits-$n-s$seed:--bits,$bits,--seed,$seed${f:+,$f}")
        done
    done
done
exec "$(dirname "$0")/results_small_llama.sh" "$out" "${cfgs[@]}"
