#!/usr/bin/env bash
# On an Ascend host (Atlas 800T/800I A2, Atlas 300I Duo; x86_64 or aarch64/Kunpeng) with the CANN
# toolkit installed: cann packages proven on the NPU.
#  1. The bench checkpoint is exported three ways on the CPU with .venv: cpu fp32 (the reference),
#     cann fp16, cann fp32; `glm-image-onnx check --provider cann` must find 0 fallbacks in both.
#  2. In .venv-cann (onnxruntime-cann replaces onnxruntime; numpy<2; no torch), scripts/check_device.py
#     --provider cann then, for each cann package (strict: no silent CPU fallback): onnxruntime's own
#     node placement per graph (its session log), where the cache buffers live, the image against the
#     CPU fp32 package at fixed AR tokens and latents, the first 1024x1024 generation (graph compiles
#     included) and a second one with another prompt (same buckets: nothing to compile), with AR
#     ms/token, DiT ms/step and VAE time.
#  3. The trained demo model (models/demo) exported for cann fp16 and fp32: scripts/check_demo.py draws
#     its two smoke prompts on the NPU, saves the PNGs under $OUT_DIR/demo-images and reads them by OCR
#     (apt-get install tesseract-ocr on the host, or read the PNGs elsewhere).
# Needs the CANN toolkit onnxruntime-cann was built against (server/README.md, "Ascend") and its
# environment: set ASCEND_TOOLKIT_HOME or keep the default /usr/local/Ascend/ascend-toolkit/latest.
# Never run by CI (no NPU there). Usage: bash scripts/check_cann.sh [--quick]  (quick: 512x512)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_CANN=${ORT_CANN:-onnxruntime-cann==1.24.4}
OUT=${OUT_DIR:-out/check-cann}
TOOLKIT=${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit/latest}
log() { echo "[check_cann $(date +%H:%M:%S)] $*" >&2; }

[ -f "$TOOLKIT/set_env.sh" ] || [ -f "$TOOLKIT/../set_env.sh" ] \
  || { echo "no CANN toolkit at $TOOLKIT (set ASCEND_TOOLKIT_HOME)" >&2; exit 1; }
# shellcheck disable=SC1090,SC1091
source "$TOOLKIT/set_env.sh" 2>/dev/null || source "$TOOLKIT/../set_env.sh"
command -v npu-smi >/dev/null && npu-smi info | head -n 12 || log "npu-smi not found (driver not installed?)"

bash scripts/setup.sh >/dev/null
if [ ! -x .venv-cann/bin/python ] || ! .venv-cann/bin/python -c "import onnxruntime, glm_image_onnx" 2>/dev/null; then
  log "creating .venv-cann with $ORT_CANN"
  python3 -m venv .venv-cann
  .venv-cann/bin/python -m pip install -q --upgrade pip
  .venv-cann/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu || true
  .venv-cann/bin/python -m pip install -q "$ORT_CANN" "numpy<2" tokenizers pillow jinja2
  .venv-cann/bin/python -m pip install -q --no-deps -e .
fi
mkdir -p "$OUT"
[ -f "$OUT/bench-ck/model_index.json" ] || .venv/bin/glm-image-onnx init-checkpoint --preset bench --seed 0 "$OUT/bench-ck"
for spec in "cpu fp32" "cann fp16" "cann fp32"; do
  read -r target dtype <<< "$spec"
  pkg="$OUT/bench-$target-$dtype"
  [ -f "$pkg/manifest.json" ] || { log "export $target $dtype"
    .venv/bin/glm-image-onnx export "$OUT/bench-ck" "$pkg" --target "$target" --dtype "$dtype" --overwrite 2>&1 | grep -E "wrote|error"; }
done
for dtype in fp16 fp32; do .venv/bin/glm-image-onnx check "$OUT/bench-cann-$dtype" --provider cann || true; done
.venv-cann/bin/python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
.venv-cann/bin/python scripts/check_device.py --provider cann --reference "$OUT/bench-cpu-fp32" \
    --packages "$OUT/bench-cann-fp16" "$OUT/bench-cann-fp32" "$@"
for dtype in fp16 fp32; do
  pkg="$OUT/demo-cann-$dtype"
  [ -f "$pkg/manifest.json" ] || { log "export demo cann $dtype"
    .venv/bin/glm-image-onnx export models/demo "$pkg" --target cann --dtype "$dtype" --overwrite 2>&1 | grep -E "wrote|error"; }
done
.venv-cann/bin/python scripts/check_demo.py --provider cann --images "$OUT/demo-images" \
    --packages "$OUT/demo-cann-fp16" "$OUT/demo-cann-fp32"
