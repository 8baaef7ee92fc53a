#!/usr/bin/env bash
# The int4 GEMV variant sweep (bench/bench_int4_variants.cpp, not built by CMake) and a focused
# device run for the int4 decode kernel (docs/perf-notes.md, session 4).
#
#   bash scripts/device/int4_variants.sh pack BUILD_DIR BUNDLE_DIR
#       here: builds test_cuda_gptq, test_ops_cuda, bench_gptq_gemv in BUILD_DIR (configured as in
#       bundle.sh), links bench_int4_variants against its gptq_kernels_cuda / gptq_core, and packs
#       the four with libfmt into BUNDLE_DIR/bundle.tar.xz (the layout bundle.sh makes; a few MB
#       instead of the full bundle's build). BUNDLE_DIR must start with .device- (git-ignored here).
#   DEVICE_BUNDLE=BUNDLE_DIR bash scripts/device/int4_variants.sh device
#       on the GPU machine: unpacks the bundle like run.sh, then (each step a knob, 1 = on)
#       TESTS: test_cuda_gptq + test_ops_cuda; MEMCHECK: compute-sanitizer on test_cuda_gptq without
#       the Llama shapes; SWEEP: bench_int4_variants (SWEEP_ARGS); BENCH: bench_gptq_gemv (BENCH_ARGS);
#       NCU: Nsight Compute on one automatic-variant launch of the o shape (NCU_M, default 1).
#       The sweep and the benchmark run again with GPTQ_INT4_PDL=0 (no programmatic dependent launch;
#       BENCH_NOPDL=0 skips the benchmark's second run). test_llama_cuda runs LLAMA_FILTER.
#       Results under $OUT (8 files come back): summary.txt, tests.log, memcheck.log, sweep.txt,
#       sweep_nopdl.txt, bench.txt, bench_nopdl.txt, ncu.txt (and the JSON where room is left).
set -uo pipefail
mode=${1:-device}
if [ "$mode" = pack ]; then
    set -e
    BUILD=$2 DEST=$3
    ninja -C "$BUILD" -j "${JOBS:-2}" test_cuda_gptq test_ops_cuda test_llama_cuda bench_gptq_gemv gptq_kernels_cuda gptq_core
    STAGE="$BUILD/int4-bundle"
    rm -rf "$STAGE" "$DEST" && mkdir -p "$STAGE/bin" "$STAGE/lib" "$DEST"
    g++ -O2 -std=c++20 -Isrc -I/usr/local/cuda/include bench/bench_int4_variants.cpp \
        "$BUILD/src/kernels/cuda/libgptq_kernels_cuda.a" "$BUILD/src/core/libgptq_core.a" -lfmt \
        -L/usr/local/cuda/lib64 -lcudart_static -lpthread -ldl -lrt -o "$STAGE/bin/bench_int4_variants"
    cp "$BUILD"/tests/test_cuda_gptq "$BUILD"/tests/test_ops_cuda "$BUILD"/tests/test_llama_cuda "$BUILD"/bin/bench_gptq_gemv "$STAGE/bin/"
    strip "$STAGE"/bin/*
    for b in "$STAGE"/bin/*; do ldd "$b" | awk '/=> \// {print $3}'; done | sort -u |
        grep -Ev 'libc\.so|libm\.so|libstdc\+\+|libgcc_s|libpthread|libdl\.so|librt\.so|ld-linux|libcublas|libcuda|libcusolver|libcusparse|libnvJitLink' |
        while read -r lib; do cp -L "$lib" "$STAGE/lib/"; done
    git rev-parse --short HEAD > "$STAGE/COMMIT"
    tar -C "$STAGE" -cJf "$DEST/bundle.tar.xz" .
    excl=$(git rev-parse --git-path info/exclude)
    grep -qx "/$DEST/" "$excl" 2>/dev/null || echo "/$DEST/" >> "$excl"
    ls -la "$DEST" "$STAGE/lib"
    exit
fi
if [ "$mode" != device ]; then
    echo "usage: $0 pack BUILD_DIR BUNDLE_DIR | $0 device" >&2; exit 2
fi
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
DB=${DEVICE_BUNDLE:-.device-bundle}
BIN=/tmp/gptq-int4-bundle
rm -rf "$BIN" && mkdir -p "$BIN" && tar -C "$BIN" -xJf "$DB/bundle.tar.xz" || { log "no bundle in $DB"; exit 1; }
log "bundle $DB (commit $(cat $BIN/COMMIT 2>/dev/null))"
# cuBLAS / cuSOLVER (test_ops_cuda, bench_gptq_gemv) come from the machine, as in run.sh.
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
    d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)")
    [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$BIN/lib${CUDA_DIRS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export GPTQ_TEST_SOURCE_DIR=$PWD
T=$BIN/bin
status=0
if [ "${TESTS:-1}" = 1 ]; then
    for t in test_cuda_gptq test_ops_cuda test_llama_cuda; do
        filter='*'; [ $t = test_llama_cuda ] && filter=${LLAMA_FILTER:-'*gptq*:*tiny_llama*:*batched*:*reset*'}
        if timeout "${TEST_TIMEOUT:-150}" "$T/$t" --gtest_filter="$filter" > "$OUT/$t.tmp" 2>&1; then
            log "$t: $(grep -E '^\[  (PASSED|SKIPPED) ' "$OUT/$t.tmp" | tr '\n' ' ')"
        else
            status=1; log "$t FAILED"; grep -E 'FAILED|Failure|error' "$OUT/$t.tmp" | head -30 | tee -a "$OUT/summary.txt"
        fi
        cat "$OUT/$t.tmp" >> "$OUT/tests.log"; rm -f "$OUT/$t.tmp"
    done
fi
if [ "${SWEEP:-1}" = 1 ]; then
    timeout "${SWEEP_TIMEOUT:-200}" "$T/bench_int4_variants" --out /tmp/sweep.jsonl ${SWEEP_ARGS:-} > "$OUT/sweep.txt" 2>&1 ||
        { status=1; log "sweep failed or timed out (rc $?)"; }
    cat "$OUT/sweep.txt"
    # The automatic choice without programmatic dependent launch, for comparison.
    GPTQ_INT4_PDL=0 timeout 60 "$T/bench_int4_variants" --variant -1 > "$OUT/sweep_nopdl.txt" 2>&1 ||
        { status=1; log "sweep without PDL failed (rc $?)"; }
    cat "$OUT/sweep_nopdl.txt"
fi
if [ "${BENCH:-1}" = 1 ]; then
    timeout "${BENCH_TIMEOUT:-150}" "$T/bench_gptq_gemv" --out /tmp/bench.json ${BENCH_ARGS:-} 2> "$OUT/bench.txt" ||
        { status=1; log "bench_gptq_gemv failed (rc $?)"; }
    cat "$OUT/bench.txt"
    if [ "${BENCH_NOPDL:-1}" = 1 ]; then
        GPTQ_INT4_PDL=0 timeout "${BENCH_TIMEOUT:-150}" "$T/bench_gptq_gemv" --out /tmp/bench_nopdl.json ${BENCH_ARGS:-} \
            2> "$OUT/bench_nopdl.txt" || { status=1; log "bench_gptq_gemv without PDL failed (rc $?)"; }
        echo "-- without PDL (GPTQ_INT4_PDL=0):"; cat "$OUT/bench_nopdl.txt"
    fi
fi
if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
    timeout 120 ncu --kernel-name regex:int4_gemv --launch-skip 20 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats \
        --section MemoryWorkloadAnalysis "$T/bench_int4_variants" --only o --m "${NCU_M:-1}" --variant -1 --iters 5 \
        > "$OUT/ncu.txt" 2>&1 || log "ncu failed (see ncu.txt)"
    grep -E "int4_gemv|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issued Warp|No Eligible|Eligible Warps|Block Limit|Waves Per SM|Dynamic Shared" \
        "$OUT/ncu.txt" | head -40 | tee -a "$OUT/summary.txt"
fi
if [ "${MEMCHECK:-1}" = 1 ] && command -v compute-sanitizer > /dev/null; then
    if timeout "${MEMCHECK_TIMEOUT:-150}" compute-sanitizer --tool memcheck --error-exitcode 99 "$T/test_cuda_gptq" \
            --gtest_filter='-*LlamaShape*' > "$OUT/memcheck.log" 2>&1; then
        log "memcheck test_cuda_gptq: clean"
    else
        status=1; log "memcheck test_cuda_gptq: ERRORS or timeout (rc $?, see memcheck.log)"; tail -5 "$OUT/memcheck.log"
    fi
fi
log "done, status $status"
exit $status
