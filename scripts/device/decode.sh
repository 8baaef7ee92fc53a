#!/usr/bin/env bash
# The batch-1 decode step of the Llama-2-7B shape, kernel by kernel (issue 18, decode), after run.sh has
# built or unpacked gptq: make-random llama-2-7b cut to DECODE_LAYERS (default 8) layers, RTN W4 g128,
# then for each setting (the defaults; GPTQ_DECODE_FUSE=0: plain attention ops; GPTQ_DECODE_FUSE_GEMV=1:
# the GEMV fusions; GPTQ_INT4_PREFETCH=1: the L2 prefetch; GPTQ_ATTN_SPLIT_GOAL=528: twice the
# attention's key chunks):
#   0. (once) bench_gptq_gemv at m = 1, 4, 16 on the 7B shapes, L2 prefetch on and off;
#   1. gptq bench --batch DECODE_BATCH (default 1,4,16), JSON rows in $OUT/decode.jsonl;
#   2. gptq bench --profile-ops at batch 1 (uncaptured op table) into $OUT/decode.txt;
#   3. with ncu on the machine (defaults and GPTQ_DECODE_FUSE=0; DECODE_NCU_ALL=1: every setting): Nsight Compute
#      over the kernels of two decode steps (graph nodes
#      profiled one by one: int4 GEMVs, attention, RoPE/KV store, norms), SpeedOfLight + Occupancy +
#      LaunchStats, into $OUT/decode_ncu_<setting>.txt, and a one-line-per-kernel summary
#      (duration, DRAM throughput %, achieved occupancy) into $OUT/decode.txt.
#     bash scripts/device/decode.sh            (DECODE_NCU=0 skips ncu)
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
. scripts/device/bundle_env.sh || { echo "decode: run run.sh first (no build-device, no unpacked bundle)"; exit 1; }
L=${DECODE_LAYERS:-8}
W=/tmp/gptq-decode; rm -rf "$W"; mkdir -p "$W"
timeout 200 "$GPTQ" -q make-random --like "llama-2-7b-layers=$L" -o "$W/f16" --threads "$(nproc)" > /dev/null &&
    timeout 300 "$GPTQ" -q quantize "$W/f16" -o "$W/w4" --method rtn --bits 4 --group-size 128 --threads "$(nproc)" > /dev/null ||
    { echo "decode: make-random or quantize failed" | tee -a "$OUT/decode.txt"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader >> "$OUT/decode.txt"
# The int4 GEMV alone on the 7B shapes (bench_gptq_gemv: stream and graph us per launch, cuBLAS FP16
# beside), with and without the L2 prefetch.
if [ -x "$TEST_DIR/bench_gptq_gemv" ] && [ "${DECODE_GEMV:-1}" = 1 ]; then
    for pf in 0 1; do
        echo "== bench_gptq_gemv, GPTQ_INT4_PREFETCH=$pf" >> "$OUT/decode.txt"
        GPTQ_INT4_PREFETCH=$pf timeout 300 "$TEST_DIR/bench_gptq_gemv" --m 1,4,16 --models 7b \
            --out "$OUT/decode_gemv_prefetch$pf.json" 2>> "$OUT/decode.txt"
    done
fi
# DECODE_SETTINGS: a subset, e.g. "on GPTQ_DECODE_FUSE=0" (space-separated; each one VAR=VALUE or on).
for setting in ${DECODE_SETTINGS:-on GPTQ_DECODE_FUSE=0 GPTQ_DECODE_FUSE_GEMV=1 GPTQ_INT4_PREFETCH=1 GPTQ_ATTN_SPLIT_GOAL=528}; do
    envs=""; [ "$setting" != on ] && envs=$setting
    tag=$(echo "$setting" | tr ' =' '_-')
    echo "== $L layers, $setting" >> "$OUT/decode.txt"
    env $envs timeout 300 "$GPTQ" -q bench "$W/w4" --device cuda --batch "${DECODE_BATCH:-1,4,16}" --prompt 512 \
        --gen 128 --repeat 3 --json >> "$OUT/decode.jsonl" 2>> "$OUT/decode.txt" &&
        tail -n "$(echo "${DECODE_BATCH:-1,4,16}" | tr ',' '\n' | wc -l)" "$OUT/decode.jsonl" | python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l); print("batch %d: decode %.1f tok/s, %.3f ms/step" % (r["batch"], r["decode_tok_per_s"], r["decode_ms_per_step"]))' \
        >> "$OUT/decode.txt"
    env $envs timeout 200 "$GPTQ" bench "$W/w4" --device cuda --batch 1 --prompt 512 --gen 32 --repeat 1 --profile-ops \
        >> "$OUT/decode.txt" 2>&1
    ncu_this=0
    case "$setting" in on | "GPTQ_DECODE_FUSE=0") ncu_this=1 ;; esac
    [ "${DECODE_NCU_ALL:-0}" = 1 ] && ncu_this=1
    if [ "${DECODE_NCU:-1}" = 1 ] && [ $ncu_this = 1 ] && command -v ncu > /dev/null; then
        # Prefill (one pass) and the first steps run uncaptured; skip into the graph replays, then two
        # steps' worth of kernels (about 8 a layer).
        n=$((L * 8 * 2))
        env $envs timeout 300 ncu --graph-profiling node --launch-skip "${DECODE_NCU_SKIP:-400}" --launch-count "$n" \
            --section SpeedOfLight --section Occupancy --section LaunchStats --csv --page raw \
            --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
            "$GPTQ" -q bench "$W/w4" --device cuda --batch 1 --prompt 512 --gen 16 --repeat 1 \
            > "$OUT/decode_ncu_$tag.txt" 2>&1
        python3 - "$OUT/decode_ncu_$tag.txt" >> "$OUT/decode.txt" <<'EOF'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 5]
if not rows:
    print("ncu: no rows"); sys.exit(0)
head = rows[0]
def col(name):
    return head.index(name) if name in head else None
ik, it, id_, io = col("Kernel Name"), col("gpu__time_duration.sum"), col("dram__throughput.avg.pct_of_peak_sustained_elapsed"), col("sm__warps_active.avg.pct_of_peak_sustained_active")
scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(rows[1][it] if len(rows) > 1 else "", 1e-3)
agg = collections.OrderedDict()
for r in rows[2:]:
    try:
        k = r[ik][:60]; t = float(r[it]) * scale; d = float(r[id_]); o = float(r[io])
    except (ValueError, TypeError, IndexError):
        continue
    a = agg.setdefault(k, [0, 0.0, 0.0, 0.0]); a[0] += 1; a[1] += t; a[2] += d; a[3] += o
print("ncu (locked clocks): kernel, launches, mean us, mean DRAM %, mean active warps %")
for k, (n, t, d, o) in agg.items():
    print("  %-60s %4d %8.2f %6.1f %6.1f" % (k, n, t / n, d / n, o / n))
EOF
    fi
done
rm -rf "$W"
