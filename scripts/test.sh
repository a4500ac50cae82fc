#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_triton.sh   # a real tritonserver for the Triton repository test
exec .venv/bin/python -m pytest -q "$@"
