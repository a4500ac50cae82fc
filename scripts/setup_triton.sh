#!/usr/bin/env bash
# A real Triton for the tests: nvidia-pytriton's tritonserver binary with the Python backend, on
# CPU (no onnxruntime backend in it). Idempotent; GLM_IMAGE_TRITON_HOME overrides the folder.
#  - the wheel goes to a folder of its own (--target, --no-deps): only its binary is used;
#  - Triton 2.51's Python backend delivers empty tensors with numpy 2, so the stub gets numpy<2;
#  - the stub links libpython3.X.so.1.0 (Debian's libpython3.X).
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${GLM_IMAGE_TRITON_HOME:-$HOME/.cache/glm-image-onnx/triton}
PY=.venv/bin/python
if [ ! -x "$HOME_DIR/pytriton/pytriton/tritonserver/bin/tritonserver" ]; then
  $PY -m pip install -q --no-deps --target "$HOME_DIR/pytriton" nvidia-pytriton==0.7.0 2>&1 | grep -v "^WARNING: Location" || true
fi
if [ ! -d "$HOME_DIR/numpy1/numpy" ]; then
  $PY -m pip install -q --target "$HOME_DIR/numpy1" 'numpy<2' 2>&1 | grep -v "^WARNING: Location" || true
fi
ver=$($PY -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
if ! $PY -c "import ctypes; ctypes.CDLL('libpython$ver.so.1.0')" 2>/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "libpython$ver" >/dev/null
  else
    echo "setup_triton: libpython$ver.so.1.0 is missing: apt-get install libpython$ver" >&2
  fi
fi
test -x "$HOME_DIR/pytriton/pytriton/tritonserver/bin/tritonserver"
