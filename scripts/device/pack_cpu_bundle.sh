#!/usr/bin/env bash
# Make .device-carry/cpu-bundle: the release `gptq` binary, the Debian shared libraries it needs
# (xz-compressed) and, optionally, a model (bytes of F16 data split into high/low planes, then xz:
# ~15% smaller than the raw files), so that CPU-only runs can use the GPU machine's 16 cores
# within the 64 MiB a device call may carry. Unpacked there by scripts/device/cpu_bundle_env.sh.
#   scripts/device/pack_cpu_bundle.sh [MODEL_DIR]
set -euo pipefail
dst=.device-carry/cpu-bundle
rm -rf "$dst"; mkdir -p "$dst/bin" "$dst/lib" "$dst/model"
cp build/bin/gptq "$dst/bin/"
for l in $(ldd build/bin/gptq | awk '/=>/ {print $3}'); do
    case "$(basename "$l")" in libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*) continue ;; esac
    xz -T2 -6 -c "$(readlink -f "$l")" > "$dst/lib/$(basename "$l").xz"
done
if [ $# -ge 1 ]; then
    python3 - "$1" "$dst/model" <<'PY'
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for name in sorted(os.listdir(src)):
    p = os.path.join(src, name)
    if name.endswith(".safetensors"):
        b = open(p, "rb").read()
        n = int.from_bytes(b[:8], "little")
        data = b[8 + n:]
        open(os.path.join(dst, name + ".planes"), "wb").write(b[:8 + n] + data[1::2] + data[0::2])
    elif os.path.isfile(p):
        shutil.copy(p, dst)
PY
    xz -T2 -6 "$dst"/model/*.planes
fi
du -sh "$dst"
