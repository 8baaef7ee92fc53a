#!/usr/bin/env bash
# gptqkit vs llama.cpp on the CPU (issue 22): prefill and decode tok/s of small-llama at batch 1,
# one thread, our F16 and W4 g128 against llama.cpp's F16, Q4_0 and Q4_K_M of the same model.
# Nothing of llama.cpp enters the repository: its source comes from the llama-cpp-python sdist on
# PyPI (which vendors llama.cpp), built outside the repo in $LLAMACPP_DIR.
#
#   bench/cpu_vs_llamacpp.sh build      # once: download the sdist, build llama-bench + llama-quantize (-j 2, slow)
#   bench/cpu_vs_llamacpp.sh convert    # once: GGUF F16 via convert_hf_to_gguf.py, then Q4_0 and Q4_K_M
#   bench/cpu_vs_llamacpp.sh run [N] > results.jsonl   # N interleaved rounds (default 3) of every engine
#   bench/cpu_vs_llamacpp.sh table results.jsonl       # medians over the rounds (docs/perf-notes.md)
#
# Environment: GPTQ (our binary, default build-cpu/bin/gptq), MODEL (default ../shared/models/small-llama),
# W4 (our W4 g128 checkpoint; made with `gptq quantize --method rtn` when absent), W4Q (optional: a W4
# checkpoint made with --quantize-lm-head, measured too), GPTQ_BASE (optional: an earlier gptq run
# beside GPTQ in every round, engine "gptqkit-base"), LLAMACPP_DIR
# (default /work/llamacpp), PY (a Python with gguf, sentencepiece, numpy, torch-free: default /work/venv/bin/python),
# PROMPT (512), GEN (128), THREADS (1).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
GPTQ=${GPTQ:-$here/build-cpu/bin/gptq}
MODEL=${MODEL:-$here/../shared/models/small-llama}
LLAMACPP_DIR=${LLAMACPP_DIR:-/work/llamacpp}
W4=${W4:-$LLAMACPP_DIR/models/small-w4-g128}
PY=${PY:-/work/venv/bin/python}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
THREADS=${THREADS:-1}
ggufs=$LLAMACPP_DIR/models
src() { ls -d "$LLAMACPP_DIR"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1; }

build() {
    mkdir -p "$LLAMACPP_DIR"
    if [ -z "$(src)" ]; then
        (cd "$LLAMACPP_DIR" && "$PY" -m pip download llama-cpp-python --no-binary :all: --no-deps -d . &&
            tar xzf llama_cpp_python-*.tar.gz)
    fi
    local s; s=$(src)
    # GGML_NATIVE: llama.cpp at its best on this machine (AVX-512 VNNI etc.), as a user would build it.
    cmake -S "$s" -B "$LLAMACPP_DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$LLAMACPP_DIR/build" --target llama-bench llama-quantize -j 2
}

convert() {
    local s; s=$(src)
    mkdir -p "$ggufs"
    "$PY" -c "import gguf, sentencepiece" 2>/dev/null || "$PY" -m pip install gguf sentencepiece
    [ -f "$ggufs/small-f16.gguf" ] || "$PY" "$s/convert_hf_to_gguf.py" "$MODEL" --outtype f16 --outfile "$ggufs/small-f16.gguf"
    for q in Q4_0 Q4_K_M; do
        [ -f "$ggufs/small-$q.gguf" ] ||
            "$LLAMACPP_DIR/build/bin/llama-quantize" "$ggufs/small-f16.gguf" "$ggufs/small-$q.gguf" "$q"
    done
    [ -d "$W4" ] || "$GPTQ" quantize --method rtn --bits 4 --group-size 128 -o "$W4" "$MODEL"
}

run() {
    local rounds=${1:-3}
    for r in $(seq 1 "$rounds"); do
        echo "## round $r $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
        for m in "$MODEL" "$W4" ${W4Q:-}; do
            for g in "$GPTQ" ${GPTQ_BASE:-}; do  # tagged: which binary, which checkpoint (for `table`)
                local e=gptqkit; [ "$g" = "$GPTQ" ] || e=gptqkit-base
                "$g" bench "$m" --device cpu --threads "$THREADS" --batch 1 --prompt "$PROMPT" --gen "$GEN" --repeat 3 \
                    --json | sed "s|^{|{\"engine\":\"$e\",\"config\":\"$(basename "$m")\",|"
            done
        done
        for q in f16 Q4_0 Q4_K_M; do
            # pp PROMPT; tg GEN at depth 0 and after PROMPT cached tokens (-d: what `gptq bench` measures).
            "$LLAMACPP_DIR/build/bin/llama-bench" -m "$ggufs/small-$q.gguf" -t "$THREADS" -p "$PROMPT" -n "$GEN" \
                -d "0,$PROMPT" -r 3 -o jsonl
        done
    done
}

table() {
    python3 - "$1" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    j = json.loads(line)
    if "decode_tok_per_s" in j:  # gptq bench
        name = j.get("engine", "gptqkit") + " " + j.get("config", j["weights"])
        rows.setdefault((name, "prefill"), []).append(j["prefill_tok_per_s"])
        rows.setdefault((name, "decode after prompt"), []).append(j["decode_tok_per_s"])
    else:  # llama-bench
        name = "llama.cpp " + j["model_type"].split(" ", 2)[-1]
        what = "prefill" if j["n_prompt"] > 0 else ("decode after prompt" if j["n_depth"] > 0 else "decode")
        if j["n_prompt"] > 0 and j["n_depth"] > 0:
            what = "prefill after prompt"
        rows.setdefault((name, what), []).append(j["avg_ts"])
for (name, what), v in sorted(rows.items()):
    print(f"| {name} | {what} | {statistics.median(v):.0f} | {min(v):.0f}-{max(v):.0f} | {len(v)} |")
PY
}

cmd=${1:-run}
shift || true
"$cmd" "$@"
