#!/usr/bin/env bash
# Configures and builds ptk (Release, Ninja, ccache) into build/ against the torch wheel in .venv/
# (scripts/setup.sh installs it). Extra arguments go to cmake, e.g. -DPTK_CUDA=OFF for a CPU-only
# build, or -DPTK_TORCH_DIR=<site-packages>/torch for a torch 2.11.0 installed elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${PTK_BUILD_DIR:-build}
if [[ " $* " != *"PTK_TORCH_DIR"* ]] && ! compgen -G ".venv/lib/python3*/site-packages/torch/version.py" >/dev/null; then
  echo "build: no LibTorch yet (.venv/ with the torch wheel is missing): run scripts/setup.sh first" >&2
  exit 1
fi
jobs=$(nproc)
start=$(date +%s)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$jobs"
echo "build: done in $(( $(date +%s) - start )) s ($BUILD_DIR/bin/ptk)"
