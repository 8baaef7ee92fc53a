#!/usr/bin/env bash
# Source on the GPU machine: unpacks .device-carry/cpu-bundle (see pack_cpu_bundle.sh) into
# /tmp/cpu-bundle and exports GPTQ_BIN and LD_LIBRARY_PATH. The model, if any, lands in
# /tmp/cpu-bundle/model.
b=.device-carry/cpu-bundle
mkdir -p /tmp/cpu-bundle/lib /tmp/cpu-bundle/model
for f in "$b"/lib/*.xz; do xz -dc "$f" > "/tmp/cpu-bundle/lib/$(basename "${f%.xz}")"; done
for f in "$b"/model/*; do
    case "$f" in
    *.planes.xz)
        python3 - "$f" <<'PY'
import lzma, os, sys
f = sys.argv[1]
b = lzma.open(f).read()
n = int.from_bytes(b[:8], "little")
body = b[8 + n:]
half = len(body) // 2
data = bytearray(len(body))
data[1::2] = body[:half]
data[0::2] = body[half:]
out = os.path.join("/tmp/cpu-bundle/model", os.path.basename(f)[: -len(".planes.xz")])
open(out, "wb").write(b[:8 + n] + bytes(data))
PY
        ;;
    *) cp "$f" /tmp/cpu-bundle/model/ ;;
    esac
done
cp "$b/bin/gptq" /tmp/cpu-bundle/gptq
export GPTQ_BIN=/tmp/cpu-bundle/gptq
export LD_LIBRARY_PATH=/tmp/cpu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
