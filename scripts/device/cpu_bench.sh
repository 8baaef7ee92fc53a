#!/usr/bin/env bash
# gptqkit's CPU backend against llama.cpp on the GPU machine's idle cores (issue 22; docs/perf-notes.md).
# Carry .device-cpu (scripts/device/pack_cpu_bench.sh makes it here), then from the repository root:
#   bash scripts/device/cpu_bench.sh          (results under $OUT, default ./device-out)
# i.e. run(command="bash scripts/device/cpu_bench.sh", carry=[".device-cpu"]) (~5-7 min; 16 idle cores).
# small-llama (23 M) at batch 1, 1/2/4/8 threads: prefill of 512 tokens, decode of GEN tokens after a
# 512-token prompt. Ours: F16, W4 g128 RTN (F16 tied lm_head) and W4 g128 with --quantize-lm-head
# (an int4 head), all from placeholder weights of the real shapes; llama.cpp: F16 of the same shape
# with constant weights (make_f16_skeleton.py), Q4_0 and Q4_K_M made from it with llama-quantize (or,
# from an older pack, F16 / Q4_0 requantized from a carried Q4_K_M). Speed does not depend on the values. Rounds interleave every engine and thread count (a round: threads 1, 2, 4, 8 in turn,
# every model of both engines at each). Output in $OUT: bench.jsonl (one JSON line per measurement,
# tagged with round/threads/engine/config), summary.md (medians and ranges), cpu.txt, setup.log.
# With .device-cpu/gptq-base.xz (pack_cpu_bench.sh GPTQ_BASE=...) an earlier build of ours runs beside
# it in every round (engine gptqkit-base): before/after on quiet cores.
# Environment: ROUNDS (3), THREADS ("1 2 4 8"), PROMPT (512), GEN (128), DC (.device-cpu), BUDGET_S (420:
# no new round starts after this many seconds, so that one 600 s call ends with its summary), POOL_AB (1:
# after the summary, decode at each thread count > 1 with the pool's counters and two pool settings:
# pool.txt, pool-summary.txt; engines gptqkit-pool-* in bench.jsonl, round 0), POOL_END_S (560).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"1 2 4 8"}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
DC=${DC:-.device-cpu}
here=$(cd "$(dirname "$0")" && pwd)
W=/tmp/cpu-bench
mkdir -p "$OUT"
rm -rf "$W" && mkdir -p "$W/lib"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/setup.log"; }

# ---- Unpack ----
[ -d "$DC" ] || { log "no $DC: run scripts/device/pack_cpu_bench.sh on the development machine and carry it"; exit 1; }
log "bundle of commit $(cat "$DC/COMMIT") (uncommitted: $(wc -l < "$DC/DIRTY") files)"
xz -dc "$DC/gptq.xz" > "$W/gptq"
OURS="gptq"
if [ -f "$DC/gptq-base.xz" ]; then xz -dc "$DC/gptq-base.xz" > "$W/gptq-base" && chmod +x "$W/gptq-base"; OURS="gptq gptq-base"; fi
LLAMA_OK=1
if [ -f "$DC/llama-bench.xz" ]; then
    for b in llama-bench llama-quantize; do xz -dc "$DC/$b.xz" > "$W/$b" && chmod +x "$W/$b"; done
else
    log "no llama.cpp in $DC (packed with NO_LLAMA=1): ours only"; LLAMA_OK=0
fi
chmod +x "$W/gptq"
for f in "$DC"/lib/*.xz; do xz -dc "$f" > "$W/lib/$(basename "${f%.xz}")"; done
export LD_LIBRARY_PATH=$W/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
GPTQ=$W/gptq

{ lscpu; echo; grep -m1 '^flags' /proc/cpuinfo; echo; nproc; uptime; } > "$OUT/cpu.txt" 2>&1
flags=$(grep -m1 '^flags' /proc/cpuinfo)
for f in avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni; do
    case " $flags " in *" $f "*) ;; *) log "CPU lacks $f: llama.cpp (built for it) skipped"; LLAMA_OK=0 ;; esac
done
"$GPTQ" --version >> "$OUT/setup.log" 2>&1 || { log "our gptq does not start (libraries?)"; ldd "$GPTQ" >> "$OUT/setup.log"; exit 1; }

# ---- Models ----
cp -r "$DC/model" "$W/small-f16" && chmod -R u+w "$W/small-f16"
python3 "$here/placeholder_weights.py" fill "$W/small-f16" >> "$OUT/setup.log" 2>&1 || { log "placeholder weights failed"; exit 1; }
"$GPTQ" -q quantize --method rtn --bits 4 --group-size 128 -o "$W/small-w4" "$W/small-f16" >> "$OUT/setup.log" 2>&1
"$GPTQ" -q quantize --method rtn --bits 4 --group-size 128 --quantize-lm-head -o "$W/small-w4-qhead" "$W/small-f16" \
    >> "$OUT/setup.log" 2>&1
if [ -f "$DC/small-F16.gguf.xz" ]; then
    # An F16 GGUF of the model's shape with constant weights (scripts/device/make_f16_skeleton.py: 40 KB
    # compressed, where a real GGUF is 14-46 MB and the working tree leaves ~22 MB of the 64 MiB carry).
    xz -dc "$DC/small-F16.gguf.xz" > "$W/small-F16.gguf"
    if [ $LLAMA_OK = 1 ]; then
        for q in Q4_0 Q4_K_M; do
            "$W/llama-quantize" "$W/small-F16.gguf" "$W/small-$q.gguf" $q >> "$OUT/setup.log" 2>&1 ||
                log "llama-quantize to $q failed"
        done
    fi
elif [ -f "$DC/small-Q4_K_M.gguf" ]; then
    cp "$DC/small-Q4_K_M.gguf" "$W/"
    if [ $LLAMA_OK = 1 ]; then
        for q in F16 Q4_0; do
            "$W/llama-quantize" --allow-requantize "$W/small-Q4_K_M.gguf" "$W/small-$q.gguf" $q >> "$OUT/setup.log" 2>&1 ||
                log "llama-quantize to $q failed"
        done
    fi
fi
ls -la "$W" "$W"/small-* >> "$OUT/setup.log" 2>&1
log "models ready"

# ---- Rounds ----
tag() {  # prefix every JSON line of stdin with the measurement's tags
    sed -n "s/^{/{\"round\":$1,\"threads\":$2,\"engine\":\"$3\",\"config\":\"$4\",\"what\":\"$5\",/p" >> "$OUT/bench.jsonl"
}
for r in $(seq 1 "$ROUNDS"); do
    if [ $r -gt 1 ] && [ $SECONDS -gt "${BUDGET_S:-420}" ]; then log "stopping before round $r: ${SECONDS} s spent"; break; fi
    for t in $THREADS; do
        log "round $r threads $t load $(cut -d' ' -f1-3 /proc/loadavg)"
        for m in f16 w4 w4-qhead; do
            for g in $OURS; do  # gptq-base: the earlier build, engine "gptqkit-base"
                timeout 300 "$W/$g" bench "$W/small-$m" --device cpu --threads "$t" --batch 1 --prompt "$PROMPT" \
                    --gen "$GEN" --repeat 3 --json 2>> "$OUT/setup.log" | tag "$r" "$t" "gptqkit${g#gptq}" "$m" both
            done
        done
        [ $LLAMA_OK = 1 ] || continue
        for q in F16 Q4_0 Q4_K_M; do
            [ -f "$W/small-$q.gguf" ] || continue
            # prefill: PROMPT tokens from an empty cache; decode: GEN tokens after PROMPT cached ones (as gptq bench)
            timeout 300 "$W/llama-bench" -m "$W/small-$q.gguf" -t "$t" -p "$PROMPT" -n 0 -r 3 -o jsonl \
                2>> "$OUT/setup.log" | tag "$r" "$t" llama.cpp "$q" prefill
            timeout 300 "$W/llama-bench" -m "$W/small-$q.gguf" -t "$t" -p 0 -n "$GEN" -d "$PROMPT" -r 3 -o jsonl \
                2>> "$OUT/setup.log" | tag "$r" "$t" llama.cpp "$q" decode
        done
    done
done
log "done"

# ---- Summary: medians [min-max] over the rounds, and ours / llama.cpp at matching precision ----
python3 - "$OUT/bench.jsonl" > "$OUT/summary.md" <<'PY'
import json, statistics, sys
v = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    k = (j["engine"], j["config"], j["threads"])
    if j["engine"].startswith("gptqkit"):
        v.setdefault(k + ("prefill",), []).append(j["prefill_tok_per_s"])
        v.setdefault(k + ("decode",), []).append(j["decode_tok_per_s"])
    else:
        v.setdefault(k + (j["what"],), []).append(j["avg_ts"])
med = {k: statistics.median(x) for k, x in v.items()}
print("| engine | config | threads | prefill tok/s median [range] | decode after prompt tok/s median [range] |")
print("|---|---|---|---|---|")
for k in sorted({k[:3] for k in v}):
    cells = []
    for what in ("prefill", "decode"):
        x = v.get(k + (what,))
        cells.append(f"{statistics.median(x):.0f} [{min(x):.0f}-{max(x):.0f}]" if x else "-")
    print(f"| {k[0]} | {k[1]} | {k[2]} | {cells[0]} | {cells[1]} |")
print()
print("| threads | ours / llama.cpp | prefill | decode |")
print("|---|---|---|---|")
pairs = [("f16", "F16"), ("w4", "Q4_0"), ("w4", "Q4_K_M"), ("w4-qhead", "Q4_0"), ("w4-qhead", "Q4_K_M")]
for t in sorted({k[2] for k in v}):
    for a, b in pairs:
        r = []
        for what in ("prefill", "decode"):
            x, y = med.get(("gptqkit", a, t, what)), med.get(("llama.cpp", b, t, what))
            r.append(f"{x / y:.2f}" if x and y else "-")
        print(f"| {t} | {a} / {b} | {r[0]} | {r[1]} |")
if any(k[0] == "gptqkit-base" for k in v):
    print()
    print("| threads | config | new / base prefill | new / base decode |")
    print("|---|---|---|---|")
    for t in sorted({k[2] for k in v}):
        for c in ("f16", "w4", "w4-qhead"):
            r = []
            for what in ("prefill", "decode"):
                x, y = med.get(("gptqkit", c, t, what)), med.get(("gptqkit-base", c, t, what))
                r.append(f"{x / y:.2f}" if x and y else "-")
            print(f"| {t} | {c} | {r[0]} | {r[1]} |")
PY
cat "$OUT/summary.md"

# ---- The pool at 2+ threads (issue 22, session 11): decode with GPTQ_POOL_STATS (dispatches, the caller's
# wait for the workers, the workers' start latency, sleeps, contention pauses) under the default pool,
# with its contention check off (GPTQ_POOL_QUIET=0: spin whenever idle < spin_us) and with no spin
# (GPTQ_POOL_SPIN_US=0). After the summary (which it does not enter); POOL_AB=0 skips it. Each run
# starts only while fewer than POOL_END_S (560) seconds have passed (~1-3 s a run on idle cores).
if [ "${POOL_AB:-1}" = 1 ]; then
    log "pool A/B"
    for t in $THREADS; do
        [ "$t" -gt 1 ] || continue
        for mode in default quiet0 spin0; do
            case $mode in default) env=() ;; quiet0) env=(GPTQ_POOL_QUIET=0) ;; spin0) env=(GPTQ_POOL_SPIN_US=0) ;; esac
            for m in w4-qhead f16; do
                [ $SECONDS -lt "${POOL_END_S:-560}" ] || continue
                echo "## threads $t mode $mode model $m" >> "$OUT/pool.txt"
                env "${env[@]}" GPTQ_POOL_STATS=1 timeout 30 "$GPTQ" bench "$W/small-$m" --device cpu --threads "$t" \
                    --batch 1 --prompt "$PROMPT" --gen "$GEN" --repeat 3 --json 2>> "$OUT/pool.txt" |
                    tee -a "$OUT/pool.txt" | tag 0 "$t" "gptqkit-pool-$mode" "$m" both
            done
        done
    done
    grep -E "^##|pool stats|decode_tok" "$OUT/pool.txt" | sed -E 's/.*"decode_tok_per_s":([0-9.]+).*/  decode \1 tok\/s/' \
        > "$OUT/pool-summary.txt"
    log "pool A/B done"
fi
