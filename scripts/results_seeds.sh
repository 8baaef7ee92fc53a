#!/usr/bin/env bash
# The defaults study over calibration seeds (docs/results.md, "Issue 20: the defaults study, five
# calibration seeds" and "... the search"): FP16, RTN W4/W3, then for each of $BITS and $SEEDS every
# GPTQ config of $CONFIGS at g128 (128 x 512 calibration windows unless a config names its own
# --nsamples / --seqlen: scripts/results_small_llama.sh's protocol), ppl on the first $WINDOWS
# WikiText-2 windows of 512. Summary: scripts/results_seeds.py OUT.jsonl
#   GPTQ_BIN=build-cpu/bin/gptq MODEL=../shared/models/tiny-llama scripts/results_seeds.sh OUT.jsonl
#   CONFIGS="n512:--nsamples,512 gar-n512:--gar,--nsamples,512" BITS=4 SEEDS="0 1 2" BASELINES=0 ...
# A config is name:flags (flags comma-separated); BASELINES=0 skips FP16 and RTN.
set -euo pipefail
out=${1:?usage: results_seeds.sh OUT.jsonl}
export THREADS=${THREADS:-1} PPL_ARGS="--max-windows ${WINDOWS:-80}"
cfgs=()
[ "${BASELINES:-1}" = 0 ] || cfgs+=(fp16: rtn-w4:--method,rtn rtn-w3:--method,rtn,--bits,3)
configs=(${CONFIGS:-default: mse-hessian:--mse-hessian gar:--gar desc-act:--desc-act damp05:--damp-percent,0.05})
for bits in ${BITS:-4 3}; do
    for seed in ${SEEDS:-0 1 2 3 4}; do
        for c in "${configs[@]}"; do
            n=${c%%:*}; f=${c#*:}
            cfgs+=("w$bits-$n-s$seed:--bits,$bits,--seed,$seed${f:+,$f}")
        done
    done
done
exec "$(dirname "$0")/results_small_llama.sh" "$out" "${cfgs[@]}"
