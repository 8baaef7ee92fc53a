#!/usr/bin/env bash
# Quick int4 GEMM loop on the GPU machine: test_cuda_gemm, the Llama-2-7B tile x split sweep and an
# optional Nsight Compute look at one tile, from a small bundle of just test_cuda_gemm and
# bench_gptq_gemv (.device-gemm/bundle.tar.xz: the two binaries + libfmt/libpcre2, made by hand, see
# docs/cuda.md "Prefill GEMM"). run(command="bash scripts/device/gemm_quick.sh", carry=[".device-gemm"])
# Knobs: QUICK_M (bench m list), QUICK_SWEEP=0, QUICK_NCU="shape:m:tile:splits ..." (tile numbers of
# int4_gemm_tile: 1-4 mma.sync, 5-11 wgmma, 12-16 warp-streamed), QUICK_WS=0 (skip the warp-streamed
# checks: test_cuda_gemm with GPTQ_INT4_WS_TABLE=1, the ws tiles with and without the L2 prefetch).
# The sweep's "best" lines give each kernel family's best tile x split per shape beside cuBLAS, the
# "summed" lines the Llama-2-7B shapes summed.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}; mkdir -p "$OUT"
# Without .device-gemm: the binaries of the main bundle that run.sh unpacked (/tmp/gptq-device-bundle).
if [ -d .device-gemm ]; then
  BIN=/tmp/gb; rm -rf $BIN; mkdir -p $BIN; tar -C $BIN -xJf .device-gemm/bundle.tar.xz
else
  BIN=/tmp/gptq-device-bundle
fi
CUDA_DIRS=""
for lib in libcublas.so.13 libcusolver.so.12 libcusparse.so.12 libnvJitLink.so.13; do
  d=$(dirname "$(find /usr/local /opt /usr/lib -name "$lib*" 2>/dev/null | head -1)"); [ "$d" != . ] && CUDA_DIRS="$CUDA_DIRS:$d"
done
export LD_LIBRARY_PATH=$BIN/lib${CUDA_DIRS}:/usr/local/cuda/lib64
export GPTQ_TEST_SOURCE_DIR=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 $BIN/bin/test_cuda_gemm 2>&1 | grep -E "^\[  |Failure|gpu|tile=|Expected|Which" | head -60
timeout 300 $BIN/bin/bench_gptq_gemv --models 7b --m "${QUICK_M:-17,32,64,128,256,512,1024,2048}" \
    $([ "${QUICK_SWEEP:-1}" = 1 ] && echo --sweep) --out $OUT/b7.json 2> $OUT/b7.txt; echo bench rc $?
grep -v sweep $OUT/b7.txt | head -90
for spec in ${QUICK_NCU:-}; do
  IFS=: read -r shape m tile splits <<< "$spec"
  kn=int4_gemm_wgmma_kernel; [ "$tile" -le 4 ] && kn=int4_gemm_kernel; [ "$tile" -ge 12 ] && kn=int4_gemm_ws_kernel
  timeout 60 ncu --kernel-name regex:$kn --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats $BIN/bin/bench_gptq_gemv --only $shape --m $m --iters 3 --tile $tile --splits $splits \
      --out /dev/null > $OUT/ncu_${shape}_${m}_${tile}.txt 2>&1
  echo "== ncu $spec"; grep -E "int4_gemm|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)|Duration|Achieved Occupancy|Issued Warp|No Eligible|Warp Cycles Per Issued|Registers Per|Block Limit|Grid Size|Stall" $OUT/ncu_${shape}_${m}_${tile}.txt | head -30
done
if [ "${QUICK_WS:-1}" = 1 ]; then
  echo "== GPTQ_INT4_WS_TABLE=1 test_cuda_gemm (the table with the warp-streamed tiles)"
  GPTQ_INT4_WS_TABLE=1 timeout 120 $BIN/bin/test_cuda_gemm --gtest_filter='*FusedMatches*:*Columns*:*OpPrefill*:*PlanTable*' 2>&1 | grep -E "^\[  |Failure|gpu|tile=|Expected|Which" | head -30
  echo "== ws_m64_n256 (13) and ws_m128_n256 (16), table splits, L2 prefetch on / off (fused column)"
  for pf in 1 0; do
    for tile in 13 16; do
      GPTQ_INT4_WS_PREFETCH=$pf timeout 60 $BIN/bin/bench_gptq_gemv --models 7b --m 64,128 --tile $tile --out /dev/null 2>&1 \
        | awk -v pf=$pf -v t=$tile 'NR > 1 && $3 > 16 {printf "pf=%s tile=%s %-8s m=%-4s fp16 %7s fused %7s\n", pf, t, $2, $3, $4, $7}'
    done
  done
fi
# QUICK_DBG=1: an uncommitted debug build (bench_dbg in the bundle) with GPTQ_DBG_X16=1 (x copied in
# 16-byte pieces without the k transposition: wrong results, timing only).
if [ "${QUICK_DBG:-0}" = 1 ] && [ -x $BIN/bin/bench_dbg ]; then
  echo "== dbg x16"; GPTQ_DBG_X16=1 timeout 60 $BIN/bin/bench_dbg --models 7b --m 32,64,128,256 --out /dev/null 2>&1 | grep -v sweep | head -20
fi
# Replay of issue 18's one-off OpPrefillPaths failure (seed 2609901896; path 2 = dequantize + cuBLAS).
echo "== replay seed 2609901896"; GPTQ_TEST_SEED=2609901896 timeout 60 $BIN/bin/test_cuda_gemm --gtest_filter='*OpPrefillPaths*' 2>&1 | grep -E "^\[  |gpu|Failure" | head -12
