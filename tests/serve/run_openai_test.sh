#!/usr/bin/env bash
# The end-to-end test of `gptq serve` with the official OpenAI Python client (tests/serve/
# test_serve_openai.py). The client is installed from PyPI into a venv (kept between runs); the
# server never uses Python. Without network (pip fails) the test is skipped (exit 77) saying why.
#   tests/serve/run_openai_test.sh GPTQ_BINARY VENV_DIR
set -uo pipefail
gptq=${1:?usage: run_openai_test.sh GPTQ_BINARY VENV_DIR}
venv=${2:?usage: run_openai_test.sh GPTQ_BINARY VENV_DIR}
here=$(cd "$(dirname "$0")" && pwd)
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        echo "SKIP: python3 -m venv failed (Debian: apt-get install python3-venv); the openai client is needed"
        exit 77
    fi
    if ! timeout 180 "$venv/bin/pip" install -q --disable-pip-version-check "openai>=1.40,<4" 2>&1 | tail -3; then
        :
    fi
    if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
        echo "SKIP: could not install the openai package from PyPI into $venv (no network?)"
        exit 77
    fi
fi
exec "$venv/bin/python" "$here/test_serve_openai.py" "$gptq"
