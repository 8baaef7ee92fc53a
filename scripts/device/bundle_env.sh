#!/usr/bin/env bash
# Source on the GPU machine after run.sh has built (build-device/) or unpacked the bundle
# (/tmp/gptq-device-bundle): sets TEST_DIR and GPTQ, and for the bundle exports LD_LIBRARY_PATH
# (the bundle's libraries, then the machine's cuBLAS / cuSOLVER / cuSPARSE / nvJitLink, too large
# to carry). Returns 1 when neither is there. Also exports GPTQ_TEST_SOURCE_DIR=$PWD.
if [ -x build-device/tests/test_llama_cuda ]; then
    TEST_DIR=build-device/tests GPTQ=build-device/bin/gptq
else
    B=/tmp/gptq-device-bundle
    [ -x "$B/bin/test_llama_cuda" ] || return 1
    TEST_DIR=$B/bin GPTQ=$B/bin/gptq
    CUDA_DIRS=""
    for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
        d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
        [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
    done
    export LD_LIBRARY_PATH=$B/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
fi
export GPTQ_TEST_SOURCE_DIR=$PWD
