#!/usr/bin/env bash
# docs/interop.md part 1 on a GPU machine: our checkpoints of small-llama in the peers' readers,
# every window (the full GPTQ-paper protocol, which the CPU table shortens), float16 as the peers
# run on a GPU. Not run yet: the CPU table in docs/interop.md is what was measured.
#
# The machine's python3 must have torch 2.11 and transformers 5.17 (the device image does); the
# rest (optimum 2.3.0, gptqmodel 7.6.0 and the packages it imports, auto-gptq 0.7.1 --no-deps)
# comes as wheels in WHEELS (default .whl) made beforehand where pip works, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl optimum==2.3.0 ...
# (gptqmodel is an sdist: `pip wheel --no-deps gptqmodel==7.6.0 -w .whl` makes the wheel).
# The quantized checkpoints are folders named as peers_ppl.py's CONFIGS under WORK (default
# .device-interop, carried; peers_ppl.py reuses them instead of quantizing), MODEL the FP16
# original, and our CLI GPTQ_BIN (a CPU build is enough: `gptq ppl` runs on the CPU there).
#   bash scripts/device/interop_peers.sh            (results under $OUT, default ./device-out)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/device-out}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-.device-interop}
mkdir -p "$OUT"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 scripts/interop/peers_ppl.py --model "${MODEL:-$WORK/small-llama}" --work "$WORK" \
    ${GPTQ_BIN:+--gptq "$GPTQ_BIN"} --device cuda --dtype float16 --max-windows 0 \
    --json "$OUT/interop-peers.json" 2>&1 | tee "$OUT/interop-peers.log" ||
    echo "peers_ppl.py: some reader refused or disagreed (exit 1 by design): see the log"
# Issue 20 (docs/interop.md "Mixed precision and a quantized lm_head"): the lm_head and
# --target-bpw checkpoints at the models' training context (ISSUE20=0 skips; folders under
# $WORK/issue20, quantized there if missing: carry them or a gptq binary).
if [ "${ISSUE20:-1}" = 1 ]; then
    python3 scripts/interop/peers_ppl.py --model "${MODEL:-$WORK/small-llama}" --work "$WORK/issue20" \
        ${GPTQ_BIN:+--gptq "$GPTQ_BIN"} --configs issue20 --seqlen 512 --device cuda --dtype float16 \
        --max-windows 0 --quantize-flags "--nsamples 32 --seqlen 512" --no-fp16-check \
        --json "$OUT/interop-issue20.json" 2>&1 | tee "$OUT/interop-issue20.log" ||
        echo "peers_ppl.py: some reader refused or disagreed (expected for transformers/AutoGPTQ): see the log"
fi
