#!/usr/bin/env bash
# Greedy-generation goldens (tests/data/generate/goldens.json), in two steps:
#   scripts/device/make_generate_goldens.sh prepare [GPTQ_BIN]   here: fill .device-carry/
#   scripts/device/make_generate_goldens.sh device               on the device (carry .device-carry)
# prepare copies ../shared/models/small-llama and makes the RTN checkpoint of the bundled tiny-llama
# (`gptq quantize --method rtn`, deterministic), keeping only its quantized tensors (the rest of an
# RTN checkpoint is the base model, which travels with the tree) to stay under the 64 MiB the
# device call carries. device runs make_generate_goldens.py and writes $OUT/goldens.json; copy it
# to tests/data/generate/goldens.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-}
carry=.device-carry

case "$mode" in
prepare)
    gptq=${2:-build/bin/gptq}
    mkdir -p "$carry"
    chmod -R u+w "$carry" 2>/dev/null || true
    rm -rf "$carry/small-llama" "$carry/tiny-llama-rtn" "$carry/tiny-llama-rtn-full"
    cp -r ../shared/models/small-llama "$carry/small-llama"
    chmod -R u+w "$carry/small-llama"
    "$gptq" -q quantize models/tiny-llama -o "$carry/tiny-llama-rtn-full" --method rtn
    mkdir -p "$carry/tiny-llama-rtn"
    cp "$carry/tiny-llama-rtn-full/quantize_config.json" "$carry/tiny-llama-rtn/"
    python3 - "$carry/tiny-llama-rtn-full" "$carry/tiny-llama-rtn/quant.safetensors" <<'EOF'
# Copy the qweight/qzeros/scales/g_idx tensors of every shard into one safetensors file (raw bytes).
import glob, json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
header, blobs, off = {}, [], 0
for path in sorted(glob.glob(src + "/*.safetensors")):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        for name, info in h.items():
            if name == "__metadata__" or name.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx"):
                continue
            a, b = info["data_offsets"]
            f.seek(8 + n + a)
            blobs.append(f.read(b - a))
            header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [off, off + b - a]}
            off += b - a
hj = json.dumps(header).encode()
hj += b" " * ((8 - len(hj) % 8) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(hj))); f.write(hj)
    for b in blobs: f.write(b)
print(f"{dst}: {len(header)} tensors, {off} bytes")
EOF
    rm -rf "$carry/tiny-llama-rtn-full"
    du -sh "$carry"
    ;;
device)
    export PYTHONUNBUFFERED=1
    python3 scripts/device/make_generate_goldens.py \
        --model tiny-llama=models/tiny-llama \
        --model small-llama="$carry/small-llama" \
        --gptq tiny-llama-gptq-rtn="models/tiny-llama:$carry/tiny-llama-rtn" \
        --out "${OUT:-out}" 2>&1 | tee "${OUT:-out}/log.txt"
    ;;
*)
    echo "usage: $0 prepare [GPTQ_BIN] | device" >&2
    exit 2
    ;;
esac
