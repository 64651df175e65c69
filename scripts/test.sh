#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs the whole suite (unit,
# integration and slow labels). Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
cd "${PTK_BUILD_DIR:-build}"
ctest -j "$(nproc)" --output-on-failure "$@"
