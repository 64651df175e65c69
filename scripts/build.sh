#!/usr/bin/env bash
# Configures and builds ptk (Release, Ninja, ccache) into build/. Extra arguments go to cmake.
# For a CUDA build: scripts/build.sh -DPTK_CUDA=ON -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${PTK_BUILD_DIR:-build}
jobs=$(nproc)
start=$(date +%s)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$jobs"
echo "build: done in $(( $(date +%s) - start )) s ($BUILD_DIR/bin/ptk)"
