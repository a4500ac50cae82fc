#!/usr/bin/env bash
# tesseract, the OCR oracle of the demo model's tests and benchmark (Debian's package; as root, as CI runs).
set -euo pipefail
command -v tesseract >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends tesseract-ocr >/dev/null
tesseract --version | head -1
