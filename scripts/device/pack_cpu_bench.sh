#!/usr/bin/env bash
# Prepare .device-cpu/ for scripts/device/cpu_bench.sh (issue 22: the CPU backend against llama.cpp on
# the GPU machine's idle cores). Run here, from the repository root, after building build-cpu/bin/gptq
# (GPTQ_CUDA=OFF, no -march=native: the kernels pick AVX2/AVX-512 at run time) and a portable static
# llama.cpp (see below). What it holds (~17 MB of the 64 MiB a device call may carry):
#   gptq.xz, lib/*.xz         our CPU binary and the Debian shared libraries it needs (not glibc)
#   llama-bench.xz, llama-quantize.xz   llama.cpp, statically linked, GGML_NATIVE=OFF with
#                             AVX/AVX2/FMA/F16C/BMI2/AVX512(F,CD,VL,DQ,BW)/AVX512_VNNI, OpenMP
#   small-F16.gguf.xz         a GGUF F16 of small-llama's shape with constant weights (make_f16_skeleton.py,
#                             from llama.cpp's Q4_K_M of it: metadata and tensor list; 40 KB compressed);
#                             Q4_0 and Q4_K_M are made from it there. A real GGUF (14-46 MB) does not fit:
#                             the working tree itself is ~42 MB of the 64 MiB a call may carry.
#   model/                    small-llama's config, tokenizer and safetensors HEADERS only: the
#                             weights are seeded placeholders written there (placeholder_weights.py),
#                             since speed does not depend on the values and the F16 shards are 46 MB
# Portable llama.cpp (once; the sdist of bench/cpu_vs_llamacpp.sh build):
#   cmake -S $LLAMACPP_DIR/llama_cpp_python-*/vendor/llama.cpp -B $LLAMACPP_PORTABLE -DCMAKE_BUILD_TYPE=Release \
#     -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
#     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_EXE_LINKER_FLAGS=-static
#   cmake --build $LLAMACPP_PORTABLE --target llama-bench llama-quantize -j 2
# Environment: GPTQ (default build-cpu/bin/gptq), GPTQ_BASE (optional: an earlier gptq, run beside it), MODEL (../shared/models/small-llama), LLAMACPP_DIR
# (/work/llamacpp: models/small-Q4_K_M.gguf), LLAMACPP_PORTABLE (/work/hcpu/llamacpp-portable), DST (.device-cpu),
# PY (a Python with the gguf package: /work/venv/bin/python).
set -euo pipefail
GPTQ=${GPTQ:-build-cpu/bin/gptq}
MODEL=${MODEL:-../shared/models/small-llama}
LLAMACPP_DIR=${LLAMACPP_DIR:-/work/llamacpp}
LLAMACPP_PORTABLE=${LLAMACPP_PORTABLE:-/work/hcpu/llamacpp-portable}
DST=${DST:-.device-cpu}
here=$(cd "$(dirname "$0")" && pwd)

rm -rf "$DST"
mkdir -p "$DST/lib"
xz -T2 -6 -c "$GPTQ" > "$DST/gptq.xz"
# An earlier build of ours (same libraries), measured in the same rounds: before/after on quiet cores.
if [ -n "${GPTQ_BASE:-}" ]; then xz -T2 -6 -c "$GPTQ_BASE" > "$DST/gptq-base.xz"; fi
for l in $(ldd "$GPTQ" | awk '/=>/ {print $3}'); do
    case "$(basename "$l")" in libc.so*|libm.so*|libgcc_s*|ld-linux*) continue ;; esac
    xz -T2 -6 -c "$(readlink -f "$l")" > "$DST/lib/$(basename "$l").xz"
done
# NO_LLAMA=1: ours only (the pool A/B and before/after need no llama.cpp; cpu_bench.sh skips it).
if [ "${NO_LLAMA:-0}" != 1 ]; then
    for b in llama-bench llama-quantize; do
        f=$LLAMACPP_PORTABLE/bin/$b
        if ! file "$f" | grep -q "statically linked"; then echo "$f is not statically linked" >&2; exit 1; fi
        strip -o "$DST/$b" "$f" && xz -T2 -6 "$DST/$b"
    done
    ${PY:-/work/venv/bin/python} "$here/make_f16_skeleton.py" "$LLAMACPP_DIR/models/small-Q4_K_M.gguf" "$DST/small-F16.gguf"
    xz -T2 -9 "$DST/small-F16.gguf"
fi
python3 "$here/placeholder_weights.py" headers "$MODEL" "$DST/model"
git rev-parse HEAD > "$DST/COMMIT"
git status --porcelain --untracked-files=no | head -5 > "$DST/DIRTY"
du -sh "$DST"
