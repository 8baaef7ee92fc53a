#!/usr/bin/env bash
# Install what gptqkit needs to build and test, from Debian's packages; only what is missing.
# Idempotent: a second run installs nothing. See docs/dependencies.md for why each one is here.
set -euo pipefail

packages=(
    build-essential cmake ninja-build pkg-config python3 python3-venv
    nlohmann-json3-dev libcli11-dev libfmt-dev libcpp-httplib-dev
    libpcre2-dev libsentencepiece-dev libopenblas-dev
    libgtest-dev libgmock-dev libbenchmark-dev
    clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} packages present"
    exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
