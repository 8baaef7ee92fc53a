#!/usr/bin/env bash
# Issue 20's size-vs-ppl comparison (docs/results.md, "Issue 20: file size against llama.cpp's
# k-quants"): llama.cpp's k-quants of small-llama scored with OUR protocol, against our GPTQ points.
#
#   scripts/kquant_compare.sh kquants OUT.jsonl   # llama-quantize each type from the F16 GGUF, dequantize it
#                                                 # back to HF F32 (scripts/gguf_to_hf.py), `gptq ppl`
#   scripts/kquant_compare.sh ours OUT.jsonl      # `gptq quantize` (--target-bpw 2.5 .. 4.5, W2/W3/W4/W8 g128,
#                                                 # with and without --quantize-lm-head; W4, W3, --target-bpw 3.5
#                                                 # with --quantize-embeddings at 8 and 4 bits), `gptq ppl`
#   scripts/kquant_compare.sh table OUT.jsonl [POINTS.json [LINEAR_POINTS.json]]  # Markdown table;
#       points (ppl against file size / against the decoder linears' bits per weight) for
#       `gptq report POINTS.json --plot out.svg`
#
# Protocol: WikiText-2 test, seqlen 512, the first $WINDOWS windows (0: all 791) of `gptq ppl`; ours
# calibrate on 128 x 512 windows of the bundled text, seed 0 (scripts/results_small_llama.sh).
# Sizes: a GGUF's bytes (it also holds the tokenizer: reported apart as metadata bytes); ours the
# output's *.safetensors bytes; bits per weight = tensor bytes x 8 / all parameters of the model
# (embeddings, norms and the tied lm_head counted once). Nothing of llama.cpp enters the repository:
# bench/cpu_vs_llamacpp.sh builds llama-quantize in $LLAMACPP_DIR and makes the F16 GGUF
# (`bench/cpu_vs_llamacpp.sh build`, `... convert`).
#
# Environment: GPTQ_BIN (build-cpu/bin/gptq), MODEL (../shared/models/small-llama), LLAMACPP_DIR
# (/work/llamacpp), PY (a Python with gguf, numpy, safetensors: /work/venv/bin/python), WORK
# (/tmp/gptqkit-kquant), THREADS (2), WINDOWS (0), SEED (0: the calibration seed of ours; give
# its configs names of their own), TYPES / CONFIGS (override the lists below).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gptq=${GPTQ_BIN:-$here/build-cpu/bin/gptq}
model=${MODEL:-$here/../shared/models/small-llama}
llamacpp=${LLAMACPP_DIR:-/work/llamacpp}
py=${PY:-/work/venv/bin/python}
work=${WORK:-/tmp/gptqkit-kquant}
threads=${THREADS:-2}
windows=${WINDOWS:-0}
seed=${SEED:-0}
f16=${F16_GGUF:-$llamacpp/models/small-f16.gguf}
types=(${TYPES:-F16 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_0 Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K Q8_0})
configs=(${CONFIGS:-w2-g128:--bits,2 w3-g128:--bits,3 w4-g128:--bits,4 w8-g128:--bits,8
    bpw2.5:--target-bpw,2.5 bpw3:--target-bpw,3 bpw3.5:--target-bpw,3.5 bpw4:--target-bpw,4 bpw4.5:--target-bpw,4.5
    w3-g128-lmhead:--bits,3,--quantize-lm-head w4-g128-lmhead:--bits,4,--quantize-lm-head
    bpw3-lmhead:--target-bpw,3,--quantize-lm-head bpw3.5-lmhead:--target-bpw,3.5,--quantize-lm-head
    bpw4-lmhead:--target-bpw,4,--quantize-lm-head
    w4-g128-e8:--bits,4,--quantize-embeddings,--embed-bits,8 w4-g128-e4:--bits,4,--quantize-embeddings,--embed-bits,4
    w3-g128-e8:--bits,3,--quantize-embeddings,--embed-bits,8 w3-g128-e4:--bits,3,--quantize-embeddings,--embed-bits,4
    bpw3.5-e8:--target-bpw,3.5,--quantize-embeddings,--embed-bits,8
    bpw3.5-e4:--target-bpw,3.5,--quantize-embeddings,--embed-bits,4})
mkdir -p "$work"

ppl() { "$gptq" ppl "$1" --seqlen 512 --threads "$threads" --max-windows "$windows" --json; }

kquants() {
    local out=${1:?usage: kquant_compare.sh kquants OUT.jsonl}
    [ -f "$f16" ] || { echo "no $f16: run bench/cpu_vs_llamacpp.sh build and convert first" >&2; exit 1; }
    for t in "${types[@]}"; do
        local g="$work/small-$t.gguf" hf="$work/small-$t-hf"
        if [ "$t" = F16 ]; then g=$f16; else
            [ -f "$g" ] || "$llamacpp/build/bin/llama-quantize" "$f16" "$g" "$t" > "$work/small-$t.quantize.log" 2>&1
        fi
        rm -rf "$hf"
        "$py" "$here/scripts/gguf_to_hf.py" "$g" "$model" "$hf" >&2
        local sizes p
        sizes=$("$py" - "$g" <<'PY'
import collections, json, os, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
types = collections.Counter()
for t in r.tensors:
    types[t.tensor_type.name] += int(t.n_elements)
byname = {t.name: t.tensor_type.name for t in r.tensors}
print(json.dumps({"file_bytes": os.path.getsize(sys.argv[1]), "tensor_bytes": sum(int(t.n_bytes) for t in r.tensors),
                  "params": sum(int(t.n_elements) for t in r.tensors), "types_by_params": dict(types),
                  "token_embd": byname.get("token_embd.weight"), "output": byname.get("output.weight")}))
PY
)
        p=$(ppl "$hf")
        echo "{\"side\": \"llama.cpp\", \"name\": \"$t\", \"sizes\": $sizes, \"ppl\": $p}" | tee -a "$out"
        rm -rf "$hf"
    done
}

ours() {
    local out=${1:?usage: kquant_compare.sh ours OUT.jsonl}
    for c in "${configs[@]}"; do
        local name=${c%%:*} flags=${c#*:} q args sizes p
        IFS=',' read -r -a args <<< "$flags"
        q="$work/ours-$name"; rm -rf "$q" "$q.partial"
        local t0=$SECONDS
        "$gptq" -q quantize "$model" -o "$q" --nsamples 128 --seqlen 512 --threads "$threads" --seed "$seed" \
            --report "$q.report.json" "${args[@]}" > "$q.summary.txt"
        local secs=$((SECONDS - t0))
        sizes=$("$py" - "$q" <<'PY'
import glob, json, os, struct, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors")))
tensor_bytes = 0
for f in files:
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        h = json.loads(fh.read(n))
    tensor_bytes += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")
print(json.dumps({"file_bytes": sum(os.path.getsize(f) for f in files), "tensor_bytes": tensor_bytes}))
PY
)
        p=$(ppl "$q")
        local sens  # the measure a --target-bpw plan minimised (its report), else null
        sens=$("$py" -c 'import json, sys; p = json.load(open(sys.argv[1])).get("bit_plan"); print(json.dumps(p and p.get("bpw_sensitivity", "hessian")))' "$q.report.json")
        echo "{\"side\": \"gptqkit\", \"name\": \"$name\", \"flags\": \"$flags\", \"seed\": $seed, \"bpw_sensitivity\": $sens, \"quantize_seconds\": $secs, \"sizes\": $sizes, \"ppl\": $p}" | tee -a "$out"
    done
}

table() {
    local in=${1:?usage: kquant_compare.sh table OUT.jsonl [POINTS.json [LINEAR_POINTS.json]]}
    "$py" - "$in" "$model" "$work" "$f16" "${2:-}" "${3:-}" <<'PY'
import glob, json, os, re, struct, sys
from gguf import GGUFReader
src, work, f16, points_path, linear_points_path = sys.argv[2:7]
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.")

def st_header(f):
    with open(f, "rb") as fh:
        return {k: v for k, v in json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0])).items() if k != "__metadata__"}

def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n

# The model's parameters: all (embeddings, norms, linears; a tied lm_head once) and the decoder linears'.
params = linear_params = 0
for f in glob.glob(os.path.join(src, "*.safetensors")):
    for k, v in st_header(f).items():
        params += numel(v["shape"])
        linear_params += numel(v["shape"]) if LINEAR.match(k) else 0

def gguf_bytes(path):  # (all tensor bytes, decoder-linear tensor bytes, type of token_embd)
    r = GGUFReader(path)
    lin = sum(int(t.n_bytes) for t in r.tensors
              if re.match(r"blk\.\d+\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$", t.name))
    emb = next(t.tensor_type.name for t in r.tensors if t.name == "token_embd.weight")
    return sum(int(t.n_bytes) for t in r.tensors), lin, emb

def ours_bytes(path):
    total = lin = 0
    heads, shapes = {}, {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        for k, v in st_header(f).items():
            n = v["data_offsets"][1] - v["data_offsets"][0]
            total += n
            lin += n if LINEAR.match(k) else 0
            heads[k] = v["dtype"]
            shapes[k] = v["shape"]
    head = "GPTQ" if "lm_head.qweight" in heads else ("F16 (tied)" if "lm_head.weight" not in heads else "F16")
    emb = None  # --quantize-embeddings: the table's bits and group size from its tensors
    if "model.embed_tokens.qweight" in shapes:
        vocab = shapes["model.embed_tokens.g_idx"][0]
        emb = (shapes["model.embed_tokens.qweight"][0] * 32 // vocab,
               -(-vocab // shapes["model.embed_tokens.scales"][0]))
    return total, lin, head, emb

table, pts, lpts = [], [], []
for r in rows:
    if r["side"] == "llama.cpp":
        path = f16 if r["name"] == "F16" else os.path.join(work, f"small-{r['name']}.gguf")
        total, lin, emb = gguf_bytes(path)
        label, what = r["name"], f"embeddings = lm_head {emb}"
        series = "llama.cpp (tied table quantized)"
    else:
        total, lin, head, emb = ours_bytes(os.path.join(work, f"ours-{r['name']}"))
        # --bpw-measured FILE only reuses a measurement: left out of the label. A row's seed (when
        # not 0) is named; --target-bpw rows say their measure (rows without one predate
        # --bpw-sensitivity: the Hessian measure, then the only one).
        flags = re.sub(r",--bpw-measured,[^,]*", "", r["flags"])
        if "--target-bpw" in flags and "--bpw-sensitivity" not in flags:
            flags += ",--bpw-sensitivity," + (r.get("bpw_sensitivity") or "hessian")
        label = (flags.replace(",", " ").replace("--bits ", "W").replace("--target-bpw ", "bpw ")
                 .replace("--bpw-sensitivity ", ""))
        label = re.sub(r" --quantize-embeddings --embed-bits (\d)", r" E\1", label).replace("--embed-clip ", "clip ")
        label = label.replace(" clip frequency", "")  # the default
        if r.get("seed", 0):
            label += f" (seed {r['seed']})"
        table_kind = f"embeddings W{emb[0]} g{emb[1]}" if emb else "embeddings F16"
        what = table_kind + ("; + GPTQ lm_head copy" if head == "GPTQ" else ", lm_head tied")
        if emb:
            series = "gptqkit --quantize-embeddings"
        elif head == "GPTQ":
            series = "gptqkit --quantize-lm-head"
        elif "--bpw-sensitivity,output" in flags:
            series = "gptqkit --target-bpw, output (KL) measure"
        elif "--bpw-sensitivity,hessian" in flags:
            series = "gptqkit --target-bpw, Hessian measure"
        else:
            series = "gptqkit uniform W2-W8 g128"
        if "--bpw-group-sizes" in flags and head != "GPTQ" and not emb:
            series += ", groups 32/64 too"
    fb = r["sizes"]["file_bytes"]
    table.append((fb, r["side"], label, what, total * 8 / params, lin * 8 / linear_params, r["ppl"]["ppl"]))
    # The clipping ablation and the seeds other than 0: in the table, not in the plots.
    if "clip " in label or r.get("seed", 0):
        continue
    pts.append({"series": series, "label": label, "x": round(fb / 2**20, 3), "y": round(r["ppl"]["ppl"], 3)})
    lpts.append(dict(pts[-1], x=round(lin * 8 / linear_params, 3)))
print(f"parameters: {params} (decoder linears {linear_params}); ppl windows: {rows[0]['ppl']['n_windows']}")
print("| side | config | what is quantized besides the linears | file bytes | MiB | bits/weight, all params | bits/weight, decoder linears | ppl |")
print("|---|---|---|---|---|---|---|---|")
for fb, side, label, what, bpw, lbpw, p in sorted(table):
    print(f"| {side} | {label} | {what} | {fb:,} | {fb / 2**20:.2f} | {bpw:.2f} | {lbpw:.2f} | {p:.2f} |")
# The plots leave F16 out (44 MiB would squeeze the rest) and the rows of other seeds; the table has them.
for path, title, xl, p in ((points_path, "file size", "file size (MiB)", pts),
                           (linear_points_path, "the linears' bits per weight",
                            "bits per weight, decoder linears only (embeddings and lm_head not counted)", lpts)):
    if path:
        json.dump({"title": f"small-llama: WikiText-2 ppl against {title}",
                   "x_label": xl, "y_label": "perplexity", "y_log": True,
                   "points": [q for q in p if q["label"] != "F16"]}, open(path, "w"), indent=1)
PY
}

cmd=${1:?usage: kquant_compare.sh kquants|ours|table OUT.jsonl}
shift
"$cmd" "$@"
