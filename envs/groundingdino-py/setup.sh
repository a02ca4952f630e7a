#!/usr/bin/env bash
# Build the groundingdino-py environment beside the main one:
#   bash envs/groundingdino-py/setup.sh [VENV_DIR]      (default: envs/groundingdino-py/.venv, git-ignored)
# then detect with it:
#   envs/groundingdino-py/.venv/bin/python -m grounding.detect --backend groundingdino-py \
#       --model path/GroundingDINO_SwinT_OGC.py::path/groundingdino_swint_ogc.pth \
#       --text-encoder path/bert-base-uncased IMAGE.jpg --phrases "a dog" "a red shirt"
# and test it:
#   envs/groundingdino-py/.venv/bin/python -m pytest -m groundingdino_py tests/grounding/test_detect.py
# A CUDA-free build: set TORCH_INDEX_URL to a CPU wheel index that is reachable from your machine.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/python" -m pip install -q --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1
fi
"$VENV/bin/python" -m pip install -q -r "$HERE/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import groundingdino, torchvision, transformers
from grounding.detect_gdpy import GroundingDinoPyModel  # noqa: F401
print(f"groundingdino-py environment ready: transformers {transformers.__version__}, torchvision {torchvision.__version__}")
PY
