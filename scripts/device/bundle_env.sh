#!/usr/bin/env bash
# Source on the GPU machine: sets TEST_DIR and GPTQ from run.sh's build (build-device/) or from the
# carried bundle (scripts/device/bundle.sh), unpacked into GPTQ_BUNDLE_DIR (/tmp/gptq-device-bundle)
# from DEVICE_BUNDLE (.device-bundle) unless that copy is current; for the bundle it exports
# LD_LIBRARY_PATH (the bundle's libraries, then the machine's cuBLAS / cuSOLVER / cuSPARSE /
# nvJitLink, too large to carry). Returns 1 when there is neither. Also exports
# GPTQ_TEST_SOURCE_DIR=$PWD.
if [ -x build-device/tests/test_llama_cuda ]; then
    TEST_DIR=build-device/tests GPTQ=build-device/bin/gptq
else
    B=${GPTQ_BUNDLE_DIR:-/tmp/gptq-device-bundle}
    DB=${DEVICE_BUNDLE:-.device-bundle}
    # (Re)unpacked when the carried bundle is newer than the last unpacking (a warm machine keeps /tmp).
    if [ -f "$DB/bundle.tar.xz" ] && { [ ! -f "$B/.unpacked" ] || [ "$DB/bundle.tar.xz" -nt "$B/.unpacked" ]; }; then
        rm -rf "$B" && mkdir -p "$B" && tar -C "$B" -xJf "$DB/bundle.tar.xz" && touch "$B/.unpacked" || return 1
    fi
    [ -x "$B/bin/gptq" ] || return 1
    TEST_DIR=$B/bin GPTQ=$B/bin/gptq
    CUDA_DIRS=""
    for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
        d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
        [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
    done
    export LD_LIBRARY_PATH=$B/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
fi
export GPTQ_TEST_SOURCE_DIR=$PWD
