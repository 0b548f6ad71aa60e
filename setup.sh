#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the project needs, then run the given command in it.
#   bash setup.sh                                      # set up only
#   bash setup.sh python train.py --config configs/tiny.yaml
#   bash setup.sh python -m pytest -q
# torch: 2.13.0 is pinned here because a plain `torch` requirement may pull a multi-GB CUDA build on a CPU
# machine; on a GPU node with a working CUDA torch, set KEEP_TORCH=1 to use the torch already installed
# (the venv is then created with --system-site-packages).
# The oldest transformers we support and test (requirements.txt's floor), in a second environment:
#   VENV=.venv-oldest TRANSFORMERS=5.17.0 bash setup.sh python -m pytest -q tests/test_rollout.py tests/test_train.py ...
#   (the full list: .ci/run)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${KEEP_TORCH:-0}" = "1" ]; then python3 -m venv --system-site-packages "$VENV"; else python3 -m venv "$VENV"; fi
fi
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  pip install -q torch==2.13.0
fi
pip install -q -r requirements.txt
if [ -n "${TRANSFORMERS:-}" ]; then pip install -q "transformers==$TRANSFORMERS"; fi
if [ "$#" -gt 0 ]; then exec "$@"; fi
