#!/usr/bin/env bash
# Run the libFuzzer targets of fuzz/ (docs/reliability.md).
#   scripts/fuzz.sh TARGET|all SECONDS [libFuzzer flags...]
# Builds build-fuzz (preset "fuzz": clang, ASan + UBSan; FUZZ_NO_BUILD=1 skips that), seeds each target from
# fuzz/corpus/<target>, tests/data/fuzz-regressions/<target> and real files of the repo
# (models/tiny-llama, tests/data/model), keeps the grown corpus in build-fuzz/corpus/<target> and
# any crashing input in build-fuzz/artifacts/<target>/. Prints one line per target (executions,
# corpus size, crashes) and appends it to build-fuzz/fuzz-summary.txt. Exit status 1 when a target
# crashed: copy the input it names into tests/data/fuzz-regressions/<target>/, fix, commit both.
set -euo pipefail

cd "$(dirname "$0")/.."
targets_all=(safetensors tensor_source config tokenizer_json tokenizer_text gptq_module chat_template device_map serve_request)
if [ $# -lt 2 ]; then
    echo "usage: $0 TARGET|all SECONDS [libFuzzer flags...]   (targets: ${targets_all[*]})" >&2
    exit 2
fi
which=$1
seconds=$2
shift 2
if [ "$which" = all ]; then targets=("${targets_all[@]}"); else targets=("$which"); fi

B=build-fuzz
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then  # FUZZ_NO_BUILD=1: run the executables already built
    if [ ! -f $B/build.ninja ]; then cmake --preset fuzz >/dev/null; fi
    if ! cmake --build $B --target fuzzers -j "${JOBS:-2}" > $B/build.log 2>&1; then
        tail -n 30 $B/build.log >&2
        echo "fuzz.sh: building the fuzz targets failed (full log: $B/build.log)" >&2
        exit 2
    fi
fi

# Real files from the repo, copied under unique names (many are all called model.safetensors).
seed_real() {
    local t=$1 d=$B/seeds/$t
    rm -rf "$d"
    mkdir -p "$d"
    case $t in
        safetensors)
            for f in tests/data/model/*/model.safetensors; do cp "$f" "$d/$(basename "$(dirname "$f")").safetensors"; done ;;
        tensor_source)
            for f in tests/data/model/rand-qwen2/model.safetensors tests/data/model/rand-mistral/model.safetensors; do
                { printf 'model.safetensors\n'; cat "$f"; } > "$d/$(basename "$(dirname "$f")")"
            done ;;
        config)
            cp models/tiny-llama/config.json "$d/tiny-llama-config.json"
            cp models/tiny-llama/generation_config.json "$d/tiny-llama-generation_config.json"
            cp models/tiny-llama/tokenizer_config.json "$d/tiny-llama-tokenizer_config.json"
            for f in tests/data/model/*/config.json; do cp "$f" "$d/$(basename "$(dirname "$f")")-config.json"; done ;;
        tokenizer_json)
            cp models/tiny-llama/tokenizer.json "$d/tiny-llama-tokenizer.json" ;;
        tokenizer_text)
            head -c 2000 data/wikitext2/wiki.test.raw > "$d/wikitext-head" 2>/dev/null || true ;;
    esac
    echo "$d"
}

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# One target: its line, and status 1 when it failed (a crash, a leak, a timeout).
fuzz_one() {
    local t=$1 exe=$B/bin/fuzz_$1 corpus=$B/corpus/$1 art=$B/artifacts/$1 regress=tests/data/fuzz-regressions/$1
    local log=$B/fuzz-$1.log seeds rc execs crashes line extra=()
    mkdir -p "$corpus" "$art" tests/data/fuzz-regressions
    seeds=$(seed_real "$t")
    [ -d "$regress" ] && extra+=("$regress")
    set +e
    "$exe" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 -malloc_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="$art/" "${flags[@]}" "$corpus" "fuzz/corpus/$t" "$seeds" "${extra[@]}" > "$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    crashes=$(find "$art" -type f | wc -l)
    line="$(date -u +%Y-%m-%dT%H:%MZ) $t: ${seconds} s, ${execs} executions, corpus $(find "$corpus" -type f | wc -l) files, exit $rc, $crashes crashing inputs in $art"
    echo "$line"
    echo "$line" >> $B/fuzz-summary.txt
    if [ $rc -ne 0 ]; then
        grep -E 'ERROR|SUMMARY|runtime error|GPTQ_ASSERT|assert' "$log" | head -5 >&2 || true
        echo "fuzz.sh: $t failed; log: $log" >&2
        return 1
    fi
}

# JOBS targets at a time (each libFuzzer process is single-threaded): on CI's 2 cores the same
# fuzzing time per target in half the wall time.
flags=("$@")
for t in "${targets[@]}"; do
    [ -x "$B/bin/fuzz_$t" ] || { echo "fuzz.sh: no target '$t' (${targets_all[*]})" >&2; exit 2; }
done
failed=0
running=0
for t in "${targets[@]}"; do
    if [ "$running" -ge "${JOBS:-2}" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    fuzz_one "$t" &
    running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
exit $failed
