#!/usr/bin/env bash
# Prepare .device-bundle/ for scripts/device/run.sh on the lent GPU machine, which has CUDA but not
# the project's Debian build dependencies: builds the cuda tests and the kernel benchmark here for
# sm_90a (in build-cuda-dev, 2 jobs: this machine is shared), then copies the binaries and the
# shared libraries they need that the GPU machine lacks (fmt, OpenBLAS and its Fortran runtime;
# cuBLAS, cuSOLVER with its cuSPARSE and nvJitLink, and libc come from the machine: run.sh finds
# them; 300 MB that could not travel). .device-bundle is ignored through .git/info/exclude and
# named in the `run` call's carry list. With ../shared/models/small-llama present it also packs that
# model into .device-small-llama/ (run.sh's GPU-vs-CPU perplexity): the F16 bytes split into low and
# high halves and xz-compressed (39 MB instead of 45), because the working tree and everything
# carried travel within 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build-cuda-dev}
cmake -S . -B "$BUILD" -G Ninja -DGPTQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DGPTQ_BUILD_BENCH=ON > /dev/null
# BUNDLE_BINS="gptq test_finetune_cuda": only these targets, built and packed (bin/ or tests/ of BUILD).
if [ -n "${BUNDLE_BINS:-}" ]; then
    ninja -C "$BUILD" -j "${JOBS:-2}" $BUNDLE_BINS
else
ninja -C "$BUILD" -j "${JOBS:-2}" test_cuda_kernels test_cuda_gptq test_cuda_gemm test_ops_cuda test_gptq_cuda test_llama_cuda test_offload_cuda test_lora_cuda test_moe_cuda test_finetune_cuda \
    bench_gptq_gemv bench_gptq_quantize gptq
fi
# BUNDLE_OUT: another folder than .device-bundle (helpers working beside each other; carry it and
# pass DEVICE_BUNDLE=that-folder to run.sh). It must be git-ignored (added to info/exclude below).
OUTB=${BUNDLE_OUT:-.device-bundle}
STAGE="$BUILD/device-bundle"
rm -rf "$STAGE" "$OUTB" && mkdir -p "$STAGE/bin" "$STAGE/lib" "$OUTB"
# BUNDLE_GPTQ_ONLY=1: the gptq binary alone (~4 MB less), so that .device-small-llama fits beside it
# in the 64 MiB a `run` call carries (run it with GPTQ_DEVICE_TESTS=0 GPTQ_DEVICE_E2E=0).
if [ -n "${BUNDLE_BINS:-}" ]; then
    for b in $BUNDLE_BINS; do
        if [ -x "$BUILD/bin/$b" ]; then cp "$BUILD/bin/$b" "$STAGE/bin/"; else cp "$BUILD/tests/$b" "$STAGE/bin/"; fi
    done
elif [ "${BUNDLE_GPTQ_ONLY:-0}" = 1 ]; then
    cp "$BUILD"/bin/gptq "$STAGE/bin/"
else
cp "$BUILD"/tests/test_cuda_kernels "$BUILD"/tests/test_cuda_gptq "$BUILD"/tests/test_cuda_gemm "$BUILD"/tests/test_ops_cuda \
   "$BUILD"/tests/test_gptq_cuda "$BUILD"/tests/test_llama_cuda "$BUILD"/tests/test_offload_cuda "$BUILD"/tests/test_lora_cuda "$BUILD"/tests/test_moe_cuda "$BUILD"/tests/test_finetune_cuda "$BUILD"/bin/bench_gptq_gemv \
   "$BUILD"/bin/bench_gptq_quantize "$BUILD"/bin/gptq "$STAGE/bin/"
fi
strip "$STAGE"/bin/*
for b in "$STAGE"/bin/*; do
    ldd "$b" | awk '/=> \// {print $3}'
done | sort -u | grep -Ev 'libc\.so|libm\.so|libstdc\+\+|libgcc_s|libpthread|libdl\.so|librt\.so|ld-linux|libcublas|libcuda|libcusolver|libcusparse|libnvJitLink' |
    while read -r lib; do cp -L "$lib" "$STAGE/lib/"; done
git rev-parse --short HEAD > "$STAGE/COMMIT"
# Compressed: the working tree and what it carries travel within 64 MiB (OpenBLAS alone is 36 MB).
# xz -9: a 64 MiB dictionary spans several binaries, whose kernels are the same bytes (36 -> 15 MB).
tar -C "$STAGE" -cf - . | xz -9 -T2 > "$OUTB/bundle.tar.xz"
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
grep -qx "/$OUTB/" "$excl" 2>/dev/null || echo "/$OUTB/" >> "$excl"
ls -la "$OUTB" "$STAGE/lib"

SMALL=../shared/models/small-llama
if [ -d "$SMALL" ] && [ "${BUNDLE_SMALL_LLAMA:-1}" = 1 ]; then
    rm -rf .device-small-llama && mkdir -p .device-small-llama
    python3 scripts/device/byte_split.py pack "$SMALL" .device-small-llama
    grep -qx "/.device-small-llama/" "$excl" 2>/dev/null || echo "/.device-small-llama/" >> "$excl"
    du -sh .device-small-llama
fi
