#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: CUDA packages proven on the device, in under 8 minutes.
#  1. .venv (scripts/setup.sh: export on the CPU) builds the bench checkpoint and exports it three
#     ways: cpu fp32 (the reference), cuda bf16, cuda fp16; `glm-image-onnx check --provider cuda`
#     must find 0 fallbacks in both CUDA packages.
#  2. .venv-gpu gets onnxruntime-gpu with the CUDA and cuDNN wheels it needs (its [cuda,cudnn] extra),
#     and the runtime without torch; scripts/check_cuda.py then, for each CUDA package (strict:
#     no silent CPU fallback): onnxruntime's own node placement per graph (its session log), the
#     cache buffers' device, the image against the CPU fp32 package at fixed AR tokens and latents,
#     and AR ms/token, DiT ms/step, end-to-end seconds at 1024x1024 with the AR weight-bandwidth floor.
# Never run by CI (no GPU there). Usage: bash scripts/check_cuda.sh [--quick]   (quick: 512x512 only)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
OUT=${OUT_DIR:-out/check-cuda}
log() { echo "[check_cuda $(date +%H:%M:%S)] $*" >&2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU" >&2; exit 1; }

bash scripts/setup.sh >/dev/null
mkdir -p "$OUT"
[ -f "$OUT/bench-ck/model_index.json" ] || .venv/bin/glm-image-onnx init-checkpoint --preset bench --seed 0 "$OUT/bench-ck"
for spec in "cpu fp32" "cuda bf16" "cuda fp16"; do
  set -- $spec
  pkg="$OUT/bench-$1-$2"
  [ -f "$pkg/manifest.json" ] || { log "export $1 $2"; .venv/bin/glm-image-onnx export "$OUT/bench-ck" "$pkg" --target "$1" --dtype "$2" --overwrite 2>&1 | grep -E "wrote|error" ; }
done
for dtype in bf16 fp16; do .venv/bin/glm-image-onnx check "$OUT/bench-cuda-$dtype" --provider cuda; done

if [ ! -x .venv-gpu/bin/python ]; then
  log "creating .venv-gpu with $ORT_GPU[cuda,cudnn]"
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  .venv-gpu/bin/python -m pip install -q "${ORT_GPU/==/[cuda,cudnn]==}" tokenizers pillow jinja2 onnx
  .venv-gpu/bin/python -m pip install -q --no-deps -e .
fi
.venv-gpu/bin/python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
.venv-gpu/bin/python scripts/check_cuda.py --reference "$OUT/bench-cpu-fp32" \
    --packages "$OUT/bench-cuda-bf16" "$OUT/bench-cuda-fp16" "$@"
