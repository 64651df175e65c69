#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs ptk's main job.
# Today that is what works end to end (see README's status table); it grows into the tiny
# SFT -> DPO -> RM -> GRPO pipeline as the stages land.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
PTK=${PTK_BUILD_DIR:-build}/bin/ptk
echo
echo "== ptk info: runtime and this machine's fp32 matmul rate"
"$PTK" info
echo
echo "== ptk --help"
"$PTK" --help
