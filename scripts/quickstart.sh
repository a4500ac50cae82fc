#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny random GLM-Image checkpoint,
# exported to a verified ONNX package. Writes everything under ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf out/tiny-checkpoint out/tiny-onnx
.venv/bin/glm-image-onnx init-checkpoint --preset tiny --seed 0 out/tiny-checkpoint
.venv/bin/glm-image-onnx export out/tiny-checkpoint out/tiny-onnx --verify
echo "package: out/tiny-onnx (manifest: out/tiny-onnx/manifest.json)"
