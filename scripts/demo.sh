#!/usr/bin/env bash
# The main job on a model (default: the bundled tiny-llama), run by `make demo`.
# Each step is one gptq subcommand; the binary is the release build.
set -euo pipefail
model=${1:-models/tiny-llama}
gptq=${GPTQ_BIN:-build/bin/gptq}

step() { printf '\n== %s\n' "$*"; }

step "gptq inspect $model"
"$gptq" inspect "$model"
