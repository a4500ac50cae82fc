#!/usr/bin/env bash
# Prepare .device/ for scripts/check_cuda.sh on this workplace's lent NVIDIA machine, which reaches no
# package index and takes at most 64 MiB per call (working tree + carried paths). Its image has
# Python 3.12, torch, transformers, onnx, onnxscript, tokenizers, pillow, jinja2 and the CUDA 13
# libraries (cuBLAS, cuDNN) but only the CPU onnxruntime and no diffusers. So, here:
#  - onnxruntime-gpu (1.31.1 links CUDA 13: libcublas.so.13, libcudart.so.13) for cp312, split into
#    parts of at most 56 MiB: .device/ort-part-aa, -ab, ...;
#  - diffusers, transformers and importlib_metadata wheels (the exporter's): .device/wheels/.
# Then, on the device, one call per part back to back (the machine stays warm 30 s between calls and
# keeps ignored files), carrying `.device/ort-part-XX` with the command `true`, and a last call
# carrying the last part and `.device/wheels` with `bash scripts/check_cuda.sh --offline`.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
DIFFUSERS=${DIFFUSERS:-diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')}
# The image's transformers may predate GlmImage: carry the one our exports are tested with.
TRANSFORMERS=${TRANSFORMERS:-transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')}
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/wheels /tmp/glm-device-wheels
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d /tmp/glm-device-wheels "$ORT_GPU"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .device/wheels \
    "$DIFFUSERS" "$TRANSFORMERS" importlib_metadata
wheel=$(ls /tmp/glm-device-wheels/onnxruntime_gpu-*.whl | head -n 1)
basename "$wheel" > .device/ort-wheel-name
split -b 56M "$wheel" .device/ort-part-
ls -la .device .device/wheels
echo "device calls: $(ls .device/ort-part-* | wc -l) part calls, then check_cuda.sh --offline (see this script's header)"
