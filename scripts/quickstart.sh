#!/usr/bin/env bash
# The main job end to end on the embedded default: the trained demo GLM-Image (models/demo/, real
# classes, 256x256 signs), exported to a verified ONNX package, served on loopback over gRPC (KServe
# v2 / Triton protocol) and HTTP, one client request through the stock tritonclient that writes
# out/demo.png, and one through the OpenAI Images API over HTTP that writes out/demo-http.png; then,
# where tesseract is installed, what OCR reads on both. Everything under ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PROMPT="a red sign with white letters that says 'OPEN'"
rm -rf out/demo-onnx out/demo.png out/demo-http.png
mkdir -p out
.venv/bin/glm-image-onnx export models/demo out/demo-onnx --verify
# A free loopback port, then the server in the background (stopped on exit, drained by SIGTERM).
free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HTTP_PORT=$(free_port)
.venv/bin/glm-image-onnx serve out/demo-onnx --host 127.0.0.1 --port "$PORT" --http-port "$HTTP_PORT" \
    > out/server.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  .venv/bin/python - "$PORT" <<'PY' && break
import sys
import tritonclient.grpc as g
try:
    sys.exit(0 if g.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}").is_server_ready() else 1)
except Exception:
    sys.exit(1)
PY
  kill -0 $SERVER 2>/dev/null || { cat out/server.log >&2; exit 1; }
  sleep 0.5
done
.venv/bin/glm-image-onnx client --url "127.0.0.1:$PORT" --prompt "$PROMPT" \
    --height 256 --width 256 --steps 20 --seed 0 --stream --out out/demo.png
# The same request over HTTP, as any OpenAI Images API client sends it (the image comes back base64).
curl -sS --fail-with-body "http://127.0.0.1:$HTTP_PORT/v1/images/generations" -H 'Content-Type: application/json' \
    -d '{"prompt": "a red sign with white letters that says '"'OPEN'"'", "size": "256x256", "steps": 20, "seed": 1}' \
  | .venv/bin/python -c 'import base64, json, sys; open(sys.argv[1], "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))' out/demo-http.png
echo "prompt: $PROMPT"
echo "images: out/demo.png (gRPC), out/demo-http.png (HTTP) (package: out/demo-onnx, server log: out/server.log)"
if command -v tesseract >/dev/null; then
  .venv/bin/python -m glm_image_onnx.models.demo_scene out/demo.png out/demo-http.png
else
  echo "(apt-get install tesseract-ocr to have OCR read them back)"
fi
