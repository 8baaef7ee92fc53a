#!/usr/bin/env bash
# Issue 20's defaults study on the GPU machine's CPUs (no GPU code involved): the docs/results.md
# protocol (128 x 512 calibration windows from the bundled text, WikiText-2 test at seqlen 512, all
# 791 windows) on small-llama (the CPU bundle's model: scripts/device/pack_cpu_bundle.sh
# ../shared/models/small-llama, built from the h-quality branch) and on the bundled tiny-llama
# (models/tiny-llama, identical to ../shared/models/tiny-llama), one configuration after another,
# THREADS threads each; one JSON line per run in $OUT/quality-<model>.jsonl.
#   bash scripts/device/quality.sh            # both models, the configurations below
#   MODELS=tiny bash scripts/device/quality.sh
#   MODELS=small CONFIGS="fp16 rtn-w4 gptq-w4 gptq-w4-gar" bash scripts/device/quality.sh
set -uo pipefail
source scripts/device/cpu_bundle_env.sh
export OPENBLAS_NUM_THREADS=1
nproc; lscpu | grep -m1 'Model name' || true
"$GPTQ_BIN" --version
export THREADS=${THREADS:-16}
export CALIB=$PWD/data/calib/corpus-sample.txt DATASET=$PWD/data/wikitext2/wiki.test.raw.gptq_join.txt
# Every option alone, then the combinations, at W4 g128 (and W3 for the main ones). The flags
# name every default they depend on, so the table stays valid if the defaults change.
configs=(fp16: rtn-w4:--method,rtn rtn-w3:--method,rtn,--bits,3
         gptq-w4:--calib-sampling,random,--damp-percent,0.01
         gptq-w4-contig:--calib-sampling,contiguous,--damp-percent,0.01
         gptq-w4-damp05:--damp-percent,0.05
         gptq-w4-gar:--damp-percent,0.01,--gar
         gptq-w4-mse:--damp-percent,0.01,--mse
         gptq-w4-mseh:--damp-percent,0.01,--mse-hessian
         gptq-w4-asym:--damp-percent,0.01,--no-sym
         gptq-w4-desc:--damp-percent,0.01,--desc-act
         gptq-w4-gar-d05:--damp-percent,0.05,--gar
         gptq-w4-gar-mse:--damp-percent,0.01,--gar,--mse
         gptq-w4-gar-d05-mseh:--damp-percent,0.05,--gar,--mse-hessian
         gptq-w3:--bits,3,--damp-percent,0.01
         gptq-w3-gar-d05:--bits,3,--damp-percent,0.05,--gar)
# CONFIGS="name ...": only those (a device call may run 10 minutes: small-llama takes about a
# minute per configuration on 16 cores, so run it in two or three calls).
if [ -n "${CONFIGS:-}" ]; then
    keep=()
    for c in "${configs[@]}"; do for n in $CONFIGS; do [ "${c%%:*}" = "$n" ] && keep+=("$c"); done; done
    configs=("${keep[@]}")
fi
for m in ${MODELS:-small tiny}; do
    case $m in
    small) export MODEL=/tmp/cpu-bundle/model ;;
    tiny) export MODEL=$PWD/models/tiny-llama ;;
    esac
    export WORK=/tmp/quality-$m
    for c in "${configs[@]}"; do
        bash scripts/results_small_llama.sh "$OUT/quality-$m.jsonl" "$c" >> "$OUT/log-$m.txt" 2>&1
    done
    cat "$OUT/quality-$m.jsonl"
done
