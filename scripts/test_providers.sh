#!/usr/bin/env bash
# Execution providers for real: onnxruntime-cann and onnxruntime-gpu, each in its own virtual
# environment (.venv-cann, .venv-cuda). Each wheel REPLACES onnxruntime (same import name), so they
# never go into .venv. There the runtime is installed without torch (`pip install --no-deps -e .`),
# a tiny package is exported with .venv, and tests/test_providers_accelerated.py runs in each env.
# Without the Ascend / CUDA libraries (CI) the tests check the request onnxruntime receives, the
# reported fallback to CPU, strict errors, and that the pipeline still generates the same images.
#
#   bash scripts/test_providers.sh            # both
#   bash scripts/test_providers.sh cann       # one; extra pytest arguments after `--`
#
# Idempotent: existing environments and an up-to-date package are reused. Needs .venv (scripts/setup.sh
# runs when it is missing). Pins: ORT_CANN, ORT_GPU (environment variables) override the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ORT_CANN=${ORT_CANN:-onnxruntime-cann==1.24.4}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
# onnx: `glm-image-onnx check` (the placement check) runs in each environment too.
RUNTIME_DEPS=(tokenizers pillow jinja2 pytest onnx)

eps=()
while [ $# -gt 0 ]; do
  case "$1" in
    cann|cuda) eps+=("$1"); shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [cann] [cuda] [-- pytest args]" >&2; exit 2 ;;
  esac
done
[ ${#eps[@]} -gt 0 ] || eps=(cann cuda)

log() { echo "[test_providers $(date +%H:%M:%S)] $*" >&2; }
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; echo "failed: $*" >&2; return 1; }; }

# ---------------------------------------------------------------------------- the tiny package
[ -x .venv/bin/glm-image-onnx ] || bash scripts/setup.sh
BUILD=build/provider-tests
PKG=$BUILD/tiny-onnx
REF=$BUILD/reference.npz
# Re-export when the exporter or the models change (a hash of their sources).
stamp=$(cat pyproject.toml glm_image_onnx/*.py models/*.py export/*.py | sha256sum | cut -c1-16)
if [ "$(cat "$BUILD/stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$PKG/manifest.json" ]; then
  log "building a tiny package with .venv (init-checkpoint + export)"
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  quiet .venv/bin/glm-image-onnx init-checkpoint --preset tiny --seed 0 "$BUILD/ckpt"
  quiet .venv/bin/glm-image-onnx export "$BUILD/ckpt" "$PKG"
  # Each provider's own target package, run and placement-checked in its environment.
  quiet .venv/bin/glm-image-onnx export "$BUILD/ckpt" "$BUILD/tiny-cann" --target cann --dtype fp16
  quiet .venv/bin/glm-image-onnx export "$BUILD/ckpt" "$BUILD/tiny-cuda" --target cuda --dtype fp16
  echo "$stamp" > "$BUILD/stamp"
else
  log "reusing $PKG"
fi
# The CPU pipeline's outputs in .venv (onnxruntime, numpy 2), compared in each environment.
.venv/bin/python tests/provider_reference.py "$PKG" "$REF"

# ------------------------------------------------------------------------------ the environments
make_env() {  # make_env DIR ONNXRUNTIME_REQUIREMENT [extra requirements...]
  local dir=$1 ort_req=$2; shift 2
  local want="$ort_req $* ${RUNTIME_DEPS[*]}"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.requirements" 2>/dev/null)" = "$want" ] \
     && "$dir/bin/python" -c "import onnxruntime, glm_image_onnx" 2>/dev/null; then
    log "reusing $dir"
    return
  fi
  log "creating $dir: $want"
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  quiet "$dir/bin/python" -m pip install -q --upgrade pip
  # The wheel replaces onnxruntime: remove any other build first (never two in one environment).
  quiet "$dir/bin/python" -m pip uninstall -q -y onnxruntime onnxruntime-gpu onnxruntime-cann
  quiet "$dir/bin/python" -m pip install -q "$ort_req" "$@" "${RUNTIME_DEPS[@]}"
  quiet "$dir/bin/python" -m pip install -q --no-deps -e .
  "$dir/bin/python" -c "import onnxruntime, glm_image_onnx.runtime" \
    || { echo "$dir: the runtime does not import" >&2; exit 1; }
  echo "$want" > "$dir/.requirements"
}

status=0
for ep in "${eps[@]}"; do
  case $ep in
    cann) make_env .venv-cann "$ORT_CANN" "numpy<2" ;;
    cuda) make_env .venv-cuda "$ORT_GPU" ;;
  esac
  log "$ep: $(".venv-$ep/bin/python" -c 'import onnxruntime as o, numpy as n; print("onnxruntime", o.__version__, "| numpy", n.__version__, "|", ", ".join(o.get_available_providers()))')"
  # -rs lists skips, -s shows what the tests print (the warnings and errors users would see).
  set +e
  GLM_IMAGE_ONNX_NO_SILENT_SKIPS=1 GLM_IMAGE_ONNX_EXPECT_EP=$ep GLM_IMAGE_ONNX_TEST_PACKAGE=$PWD/$PKG GLM_IMAGE_ONNX_TEST_REFERENCE=$PWD/$REF \
    GLM_IMAGE_ONNX_TEST_TARGET_PACKAGE=$PWD/$BUILD/tiny-$ep \
    ".venv-$ep/bin/python" -m pytest -q -rs -s tests/test_providers_accelerated.py "$@"
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    log "$ep: FAILED (pytest exit $rc)"
    status=1
  else
    log "$ep: passed"
  fi
done
exit $status
