#!/usr/bin/env bash
# Stage-1 GPU benchmark on a fresh CUDA machine with only this repository: set up .venv (python3 dev.py setup, a
# no-op when it is up to date), then run scripts/bench_gpu.py with the given arguments (default: paper and base,
# 48 synthetic 480x640 images each). Example: bash scripts/bench_gpu.sh --images 64
set -euo pipefail
cd "$(dirname "$0")/.."
python3 dev.py setup
exec .venv/bin/python scripts/bench_gpu.py "$@"
