#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: CUDA packages proven on the device, in under 8 minutes.
#  1. The bench checkpoint is exported three ways on the CPU: cpu fp32 (the reference), cuda bf16,
#     cuda fp16; `glm-image-onnx check --provider cuda` must find 0 fallbacks in both CUDA packages.
#  2. With onnxruntime-gpu, scripts/check_device.py then, for each CUDA package (strict: no silent CPU
#     fallback): onnxruntime's own node placement per graph (its session log), the cache buffers'
#     device, the image against the CPU fp32 package at fixed AR tokens and latents, and AR ms/token,
#     DiT ms/step, end-to-end seconds at 1024x1024 with the AR weight-bandwidth floor.
#  3. The trained demo model (models/demo) exported for cuda bf16 and fp16: scripts/check_demo.py draws
#     its two smoke prompts on the GPU and saves the PNGs under $IMAGES_DIR (default $OUT_DIR/demo-images;
#     on the lent machine set IMAGES_DIR=$OUT so they come back), read by OCR where tesseract exists.
# Two ways to get there:
#  - a host with a package index: .venv (scripts/setup.sh) exports, .venv-gpu gets onnxruntime-gpu
#    with the CUDA and cuDNN wheels it needs (its [cuda,cudnn] extra) and the runtime without torch;
#  - --offline, this workplace's lent machine (no index, 64 MiB per call): the image's python3 (its
#    torch exports: 2.11 there, not our pinned 2.13), diffusers and onnxruntime-gpu carried in .device/
#    (scripts/device_bundle.sh says how), this checkout importable through symlinks.
# Never run by CI (no GPU there). Usage: bash scripts/check_cuda.sh [--offline] [--quick]  (quick: 512x512)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
OUT=${OUT_DIR:-out/check-cuda}
OFFLINE=0
ARGS=()  # for check_device.py (--quick)
for a in "$@"; do [ "$a" = --offline ] && OFFLINE=1 || ARGS+=("$a"); done
log() { echo "[check_cuda $(date +%H:%M:%S)] $*" >&2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU" >&2; exit 1; }

if [ "$OFFLINE" = 1 ]; then
  SITE=/tmp/glm-site
  rm -rf "$SITE" && mkdir -p "$SITE/glm_image_onnx"
  wheel=/tmp/$(cat .device/ort-wheel-name)
  cat .device/ort-part-* > "$wheel"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" .device/wheels/*.whl
  for f in glm_image_onnx/*.py; do ln -s "$PWD/$f" "$SITE/glm_image_onnx/"; done
  for d in models export quantize runtime server; do ln -s "$PWD/$d" "$SITE/glm_image_onnx/$d"; done
  export PYTHONPATH=$SITE
  EXPORT=(python3 -m glm_image_onnx)
  GPU_PY=python3
else
  bash scripts/setup.sh >/dev/null
  EXPORT=(.venv/bin/glm-image-onnx)
  GPU_PY=.venv-gpu/bin/python
  if [ ! -x .venv-gpu/bin/python ]; then
    log "creating .venv-gpu with $ORT_GPU[cuda,cudnn]"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip
    .venv-gpu/bin/python -m pip install -q "${ORT_GPU/==/[cuda,cudnn]==}" tokenizers pillow jinja2 onnx
    .venv-gpu/bin/python -m pip install -q --no-deps -e .
  fi
fi
mkdir -p "$OUT"
[ -f "$OUT/bench-ck/model_index.json" ] || "${EXPORT[@]}" init-checkpoint --preset bench --seed 0 "$OUT/bench-ck"
for spec in "cpu fp32" "cuda bf16" "cuda fp16"; do
  read -r target dtype <<< "$spec"
  pkg="$OUT/bench-$target-$dtype"
  [ -f "$pkg/manifest.json" ] || { log "export $target $dtype"
    "${EXPORT[@]}" export "$OUT/bench-ck" "$pkg" --target "$target" --dtype "$dtype" --overwrite 2>&1 | grep -E "wrote|error"; }
done
for dtype in bf16 fp16; do "${EXPORT[@]}" check "$OUT/bench-cuda-$dtype" --provider cuda || true; done
"$GPU_PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
"$GPU_PY" scripts/check_device.py --reference "$OUT/bench-cpu-fp32" \
    --packages "$OUT/bench-cuda-bf16" "$OUT/bench-cuda-fp16" ${ARGS[@]+"${ARGS[@]}"}
for dtype in bf16 fp16; do
  pkg="$OUT/demo-cuda-$dtype"
  [ -f "$pkg/manifest.json" ] || { log "export demo cuda $dtype"
    "${EXPORT[@]}" export models/demo "$pkg" --target cuda --dtype "$dtype" --overwrite 2>&1 | grep -E "wrote|error"; }
done
"$GPU_PY" scripts/check_demo.py --provider cuda --images "${IMAGES_DIR:-$OUT/demo-images}" \
    --packages "$OUT/demo-cuda-bf16" "$OUT/demo-cuda-fp16"
