#!/usr/bin/env bash
# Quality table of docs/results.md: quantize ../shared/models/small-llama with 128 x 512-token
# calibration windows from the bundled calibration text (never the test split), then WikiText-2
# test perplexity at seqlen 512 (GPTQ-paper protocol, all 791 windows). One JSON line per run.
#   scripts/results_small_llama.sh OUT.jsonl [config ...]     config: name:flags (flags comma-separated;
#   a config's own --nsamples / --seqlen replace the 128 x 512)
set -euo pipefail
out=${1:?usage: results_small_llama.sh OUT.jsonl [name:flags ...]}; shift
gptq=${GPTQ_BIN:-build/bin/gptq}
model=${MODEL:-../shared/models/small-llama}
work=${WORK:-/tmp/gptqkit-results}
threads=${THREADS:-2}
calib=${CALIB:-default}        # the bundled calibration text
dataset=${DATASET:-wikitext2}  # the bundled WikiText-2 test split, joined
ppl_args=${PPL_ARGS:-}          # e.g. "--max-windows 200" for a subset
mkdir -p "$work"
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
    configs=(fp16: rtn-w4-g128:--method,rtn gptq-w4-g128: rtn-w3-g128:--method,rtn,--bits,3 gptq-w3-g128:--bits,3
             rtn-w8-g128:--method,rtn,--bits,8 gptq-w8-g128:--bits,8 gptq-w4-g128-desc:--desc-act
             gptq-w4-g128-mse:--mse gptq-w4-gall:--group-size,-1 rtn-w4-gall:--method,rtn,--group-size,-1
             gptq-w4-g128-asym:--no-sym rtn-w4-g128-asym:--method,rtn,--no-sym)
fi
for c in "${configs[@]}"; do
    name=${c%%:*}; flags=${c#*:}; IFS=',' read -r -a args <<< "$flags"
    q="$model"; qjson=null
    if [ "$name" != fp16 ]; then
        q="$work/$name"; rm -rf "$q" "$q.partial"
        # 128 x 512 calibration windows unless the config names its own --nsamples / --seqlen.
        base=()
        [[ " ${args[*]} " == *" --nsamples "* ]] || base+=(--nsamples 128)
        [[ " ${args[*]} " == *" --seqlen "* ]] || base+=(--seqlen 512)
        "$gptq" -q quantize "$model" -o "$q" "${base[@]}" --threads "$threads" --calib "$calib" \
            --report "$work/$name.report.json" "${args[@]}" > "$work/$name.summary.txt"
        qjson=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); l=r['linears'];
m=[x['error_gptq']/x['error_rtn'] for x in l if x['error_rtn']>0];
print(json.dumps({'seconds':r['seconds'],'bytes_out':r['bytes_out'],'bytes_in':r['bytes_in'],
 'mean_err_ratio': (sum(m)/len(m) if m else None), 'worst_err_ratio': (max(m) if m else None)}))" "$work/$name.report.json")
    fi
    ppl=$("$gptq" ppl "$q" --seqlen 512 --threads "$threads" --dataset "$dataset" $ppl_args --json)
    echo "{\"name\": \"$name\", \"flags\": \"$flags\", \"ppl_args\": \"$ppl_args\", \"quantize\": $qjson, \"ppl\": $ppl}" | tee -a "$out"
done
