#!/usr/bin/env bash
# Make the Python environment of the interop scripts (docs/interop.md): the peers' readers from PyPI.
#   scripts/interop/setup_venv.sh /work/venv
# torch from PyPI is the CUDA build (about 5 GB with its nvidia-* wheels); it runs on a CPU as well.
# gptqmodel 7.6.0 is pure Python (an sdist; nothing is compiled at install time).
set -euo pipefail
venv=${1:?usage: setup_venv.sh VENV_DIR}
here=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip wheel
"$venv/bin/pip" install -r "$here/requirements.txt"
# AutoGPTQ 0.7.1 without its dependency pins: only its QuantLinear files and GPTQ class are used
# (interop_common.py and make_fixtures.py load them directly; the package itself does not import
# under transformers 5). Python 3.11 gets PyPI's wheel (its CUDA .so files stay unused); other
# Pythons build the sdist, without the CUDA extension and against the venv's torch.
BUILD_CUDA_EXT=0 "$venv/bin/pip" install --no-deps --no-build-isolation auto-gptq==0.7.1
"$venv/bin/python" -c "import torch, transformers, optimum, gptqmodel; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gptqmodel', gptqmodel.__version__)"
"$venv/bin/python" -c "import importlib.util as u; s=u.find_spec('auto_gptq'); assert s, 'auto_gptq missing'; print('auto_gptq at', list(s.submodule_search_locations)[0])"
