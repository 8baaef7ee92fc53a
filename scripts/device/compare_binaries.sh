#!/usr/bin/env bash
# Bit-for-bit comparison of two gptq binaries on the GPU (a refactor's guard, issue 16 part 1): the
# same commands through BASE (built from the commit before the change) and NEW, and their outputs
# compared byte for byte. Run on the device after run.sh has unpacked the bundle (its libraries):
#     bash scripts/device/compare_binaries.sh BASE_GPTQ NEW_GPTQ OUT_FILE
# Compared: `gptq ppl --device cuda --json` (prefill path; the JSON's ppl and NLL in full precision)
# of tiny-llama and the random test models; greedy `gptq generate --device cuda` (graph decode);
# `gptq quantize --device cuda` files (the GPU calibration runner, Hessians and solve; each run
# twice with NEW first, to tell a nondeterministic GPU result from a changed one); then the ppl of
# NEW's quantized checkpoint (act-order GPTQ on the int4 kernel) through both binaries.
set -uo pipefail
BASE=$1 NEW=$2 OUTF=$3
B=/tmp/gptq-device-bundle
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
    d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
    [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$B/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
DATA=$PWD/data/wikitext2/wiki.test.raw.gptq_join.txt
W=/tmp/gptq-compare; rm -rf "$W"; mkdir -p "$W"
fails=0
say() { echo "$*" | tee -a "$OUTF"; }
same() {  # same LABEL FILE_A FILE_B
    if cmp -s "$2" "$3"; then say "SAME   $1"; else fails=$((fails + 1)); say "DIFFER $1"; diff "$2" "$3" | head -6 | tee -a "$OUTF"; fi
}
ppl() {  # ppl BIN MODEL SEQLEN [args]: the JSON's ppl and nll_mean (full precision), or the error
    local bin=$1 model=$2 sl=$3; shift 3
    "$bin" -q ppl "$model" --dataset "$DATA" --seqlen "$sl" --max-windows 8 --device cuda --json "$@" 2>&1 |
        sed -E 's/^(\{"ppl":[^,]*,"nll_mean":[^,]*),.*/\1}/'
}
gen() {  # gen BIN MODEL [args]: greedy continuation (stdout only)
    local bin=$1 model=$2; shift 2
    "$bin" -q generate "$model" -p "The history of" -n 40 --temperature 0 --device cuda "$@" 2> /dev/null ||
        echo "generate failed"
}
# (The random test models have no tokenizer: test_llama_cuda covers them against the CPU.)
# Offloaded: layers 1 and 3 and the lm_head streamed from pinned host memory.
printf '{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": 0, "lm_head": "cpu"}' > "$W/map.json"
for run in resident offload; do
    args=(); [ $run = offload ] && args=(--device-map "$W/map.json")
    ppl "$BASE" models/tiny-llama 256 "${args[@]}" > "$W/$run.ppl.base"; ppl "$NEW" models/tiny-llama 256 "${args[@]}" > "$W/$run.ppl.new"
    same "ppl cuda tiny-llama $run: $(cut -c1-90 "$W/$run.ppl.new")" "$W/$run.ppl.base" "$W/$run.ppl.new"
    gen "$BASE" models/tiny-llama "${args[@]}" > "$W/$run.gen.base"; gen "$NEW" models/tiny-llama "${args[@]}" > "$W/$run.gen.new"
    same "generate cuda greedy tiny-llama $run ($(wc -c < "$W/$run.gen.new") bytes)" "$W/$run.gen.base" "$W/$run.gen.new"
done
for v in plain desc-act no-ts; do
    extra=(); [ $v = desc-act ] && extra=(--desc-act); [ $v = no-ts ] && extra=(--no-true-sequential --no-sym)
    for b in new base new2; do
        bin=$NEW; [ $b = base ] && bin=$BASE
        "$bin" -q quantize models/tiny-llama -o "$W/q-$v-$b" --bits 4 --group-size 64 --nsamples 16 --seqlen 128 \
            --device cuda "${extra[@]}" > "$W/q-$v-$b.log" 2>&1 || say "quantize $v $b FAILED: $(tail -2 "$W/q-$v-$b.log")"
        sha256sum < "$W/q-$v-$b/model.safetensors" > "$W/q-$v-$b.sha" 2>/dev/null
    done
    same "quantize cuda $v, NEW twice (determinism)" "$W/q-$v-new.sha" "$W/q-$v-new2.sha"
    same "quantize cuda $v, BASE vs NEW model.safetensors $(cut -c1-16 "$W/q-$v-new.sha")" "$W/q-$v-base.sha" "$W/q-$v-new.sha"
done
q=$W/q-desc-act-new
ppl "$BASE" "$q" 256 > "$W/q.ppl.base"; ppl "$NEW" "$q" 256 > "$W/q.ppl.new"
same "ppl cuda of the W4 g64 act-order checkpoint: $(cut -c1-90 "$W/q.ppl.new")" "$W/q.ppl.base" "$W/q.ppl.new"
gen "$BASE" "$q" > "$W/q.gen.base"; gen "$NEW" "$q" > "$W/q.gen.new"
same "generate cuda greedy W4 act-order" "$W/q.gen.base" "$W/q.gen.new"
say "compare_binaries: $fails differing"
rm -rf "$W"
exit $((fails > 0))
