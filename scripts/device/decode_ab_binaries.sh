#!/usr/bin/env bash
# Decode A/B of builds of gptq on one model (issue 18: which commit made the step slower).
# The bundle's gptq (scripts/device/bundle_env.sh) against other builds' binaries, carried xz-compressed
# (AB_OLD_XZ: one or more space-separated files, default .device-b9/gptq.xz: `xz -9 -c OTHER/bin/gptq >
# .device-b9/gptq.xz`; folders git-ignored; each old side is named after its folder, e.g. "device-b9"),
# on make-random llama-2-7b cut to AB_LAYERS (8) layers, RTN W4 g128, `gptq bench --device cuda
# --batch 1 --prompt 512 --gen 64 --repeat 2`, AB_ROUNDS (2) interleaved rounds. Each side runs with
# the env settings of AB_NEW_ENV / AB_OLD_ENV (space-separated VAR=VALUE, e.g. GPTQ_INT4_PREFETCH=0
# for a build where the prefetch was on by default). Output: $OUT/decode_ab.txt, decode_ab.jsonl.
#   run(command="bash scripts/device/decode_ab_binaries.sh", carry=[".device-bundle", ".device-b9"])
set -uo pipefail
export OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
. scripts/device/bundle_env.sh || { echo "decode_ab: no build-device and no bundle" | tee -a "$OUT/decode_ab.txt"; exit 1; }
SIDES=(new); declare -A BIN_OF=([new]=$GPTQ)
for xzf in ${AB_OLD_XZ:-.device-b9/gptq.xz}; do
    name=$(basename "$(dirname "$xzf")"); name=${name#.}
    xz -dc "$xzf" > "/tmp/gptq-$name" && chmod +x "/tmp/gptq-$name" || { echo "decode_ab: cannot unpack $xzf"; exit 1; }
    SIDES+=("$name"); BIN_OF[$name]=/tmp/gptq-$name
done
W=/tmp/gptq-decode-ab; rm -rf "$W"; mkdir -p "$W"
timeout 200 "$GPTQ" -q make-random --like "llama-2-7b-layers=${AB_LAYERS:-8}" -o "$W/f16" --threads "$(nproc)" > /dev/null &&
    timeout 300 "$GPTQ" -q quantize "$W/f16" -o "$W/w4" --method rtn --bits 4 --group-size 128 --threads "$(nproc)" > /dev/null ||
    { echo "decode_ab: make-random or quantize failed" | tee -a "$OUT/decode_ab.txt"; exit 1; }
for r in $(seq 1 "${AB_ROUNDS:-2}"); do
    for side in "${SIDES[@]}"; do
        bin=${BIN_OF[$side]}
        if [ $side = new ]; then envs=${AB_NEW_ENV:-}; else envs=${AB_OLD_ENV:-}; fi
        env $envs timeout 200 "$bin" -q bench "$W/w4" --device cuda --batch 1 --prompt 512 --gen 64 --repeat 2 --json \
            2>> "$OUT/decode_ab.txt" | tail -1 | SIDE=$side ROUND=$r python3 -c 'import json,os,sys
for l in sys.stdin:
    r = json.loads(l); r["side"] = os.environ["SIDE"]; r["round"] = int(os.environ["ROUND"])
    open(os.environ["OUT"] + "/decode_ab.jsonl", "a").write(json.dumps(r) + "\n")
    print("round %d %-10s: decode %.3f ms/step (%.1f tok/s), prefill %.0f tok/s" % (r["round"], r["side"], r["decode_ms_per_step"], r["decode_tok_per_s"], r["prefill_tok_per_s"]))' |
            tee -a "$OUT/decode_ab.txt"
    done
done
rm -rf "$W"
