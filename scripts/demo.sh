#!/usr/bin/env bash
# The main job on a model (default: the bundled tiny-llama), run by `make demo`:
# inspect it, quantize it to 4-bit GPTQ (group size 128) and, as the baseline, with round-to-
# nearest; compare WikiText-2 perplexity of FP16 / RTN / GPTQ side by side; generate from the
# GPTQ model. Each step is one gptq subcommand of the release build.
#   scripts/demo.sh [MODEL] [OUT_DIR]      (defaults: models/tiny-llama, out/demo)
set -euo pipefail
model=${1:-models/tiny-llama}
out=${2:-out/demo}
gptq=${GPTQ_BIN:-build/bin/gptq}
seqlen=${SEQLEN:-512}  # the bundled model was trained at 512 tokens

step() { printf '\n== %s\n' "$*"; }

step "gptq inspect $model"
"$gptq" inspect "$model"

mkdir -p "$out"
rm -rf "$out/gptq-w4-g128" "$out/gptq-w4-g128.partial" "$out/rtn-w4-g128" "$out/rtn-w4-g128.partial"
step "gptq quantize $model -o $out/gptq-w4-g128 --bits 4 --group-size 128   (GPTQ, 128 x 512 calibration tokens)"
"$gptq" quantize "$model" -o "$out/gptq-w4-g128" --bits 4 --group-size 128 --nsamples 128 --seqlen 512 \
    --report "$out/gptq-w4-g128.report.json"
step "gptq quantize $model -o $out/rtn-w4-g128 --method rtn   (round-to-nearest baseline)"
"$gptq" quantize "$model" -o "$out/rtn-w4-g128" --bits 4 --group-size 128 --method rtn

step "gptq ppl (WikiText-2 test, seqlen $seqlen, GPTQ-paper protocol)"
declare -A ppl
for m in "$model" "$out/rtn-w4-g128" "$out/gptq-w4-g128"; do
    ppl[$m]=$("$gptq" ppl "$m" --seqlen "$seqlen" --json | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["ppl"])')
    printf '  %-28s ppl %s\n' "$m" "${ppl[$m]}"
done
printf '\n  %-10s %10s %10s %10s\n' "" FP16 RTN-W4 GPTQ-W4
printf '  %-10s %10s %10s %10s\n' ppl "${ppl[$model]}" "${ppl[$out/rtn-w4-g128]}" "${ppl[$out/gptq-w4-g128]}"
printf '  %-10s %10s %10s %10s\n' size "$(du -sh "$model"/*.safetensors | awk '{print $1}' | head -1)" \
    "$(du -sh "$out/rtn-w4-g128/model.safetensors" | awk '{print $1}')" \
    "$(du -sh "$out/gptq-w4-g128/model.safetensors" | awk '{print $1}')"

step "gptq generate $out/gptq-w4-g128 -p 'The history of the city' -n 48 --temperature 0   (greedy, streamed)"
"$gptq" generate "$out/gptq-w4-g128" -p "The history of the city" -n 48 --temperature 0
