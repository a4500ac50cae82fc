#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny random GLM-Image checkpoint, exported
# to a verified ONNX package, then an image generated from it without torch. Writes under ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf out/tiny-checkpoint out/tiny-onnx
.venv/bin/glm-image-onnx init-checkpoint --preset tiny --seed 0 out/tiny-checkpoint
.venv/bin/glm-image-onnx export out/tiny-checkpoint out/tiny-onnx --verify
.venv/bin/glm-image-onnx generate out/tiny-onnx --prompt "a shop sign that says 'OPEN'" \
    --height 256 --width 256 --steps 8 --seed 0 --out out/tiny.png
echo "image: out/tiny.png (package: out/tiny-onnx)"
