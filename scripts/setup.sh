#!/usr/bin/env bash
# Create .venv and install the project with the export and test extras.
# torch is pinned to the CPU build (2.13.0); anything newer pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[export,test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import glm_image_onnx, torch, onnxruntime; print('glm-image-onnx', glm_image_onnx.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
