#!/usr/bin/env bash
# On the GPU machine's CPUs: the docs/results.md quality table for the model in the CPU bundle
# (scripts/device/pack_cpu_bundle.sh ../shared/models/small-llama). Runs the configurations given
# (see scripts/results_small_llama.sh for the format) in parallel, THREADS threads each, one JSON
# line per run appended to $OUT/results.jsonl as each finishes.
#   bash scripts/device/results.sh name:flags ...
set -uo pipefail
source scripts/device/cpu_bundle_env.sh
# Parallel jobs: keep OpenBLAS from starting a thread per core in every process (we parallelise
# around single-threaded BLAS calls ourselves); without this 7 jobs on 16 cores crawled.
export OPENBLAS_NUM_THREADS=1
nproc; lscpu | grep -m1 'Model name' || true
"$GPTQ_BIN" --version
export MODEL=/tmp/cpu-bundle/model WORK=/tmp/results THREADS=${THREADS:-16}
export CALIB=$PWD/data/calib/corpus-sample.txt DATASET=$PWD/data/wikitext2/wiki.test.raw.gptq_join.txt
# PARALLEL=1: all configurations at once (THREADS each); default: one after another, THREADS
# (default 16) each: on 2026-11-24 seven parallel 2-thread jobs ran at a quarter of the speed of
# one job (600-750 tok/s each against 2581 alone), so sequential many-thread runs finish sooner.
if [ "${PARALLEL:-0}" = 1 ]; then
    for c in "$@"; do
        bash scripts/results_small_llama.sh "$OUT/results.jsonl" "$c" > "$OUT/log-${c%%:*}.txt" 2>&1 &
    done
    wait
else
    for c in "$@"; do bash scripts/results_small_llama.sh "$OUT/results.jsonl" "$c" >> "$OUT/log.txt" 2>&1; done
fi
cat "$OUT/results.jsonl"
