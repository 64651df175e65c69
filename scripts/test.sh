#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, runs the whole suite (unit,
# integration, reference and slow labels) and prints its summary: GoogleTest and unittest cases passed,
# skipped with their reasons, failed (scripts/test_summary.sh). Extra arguments go to ctest (e.g. -L unit).
#
# What set-up installed and this machine has is required: a test that would skip for want of it
# fails instead (PTK_REQUIRE; tests/support/test_util.h). Set PTK_REQUIRE yourself to override.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build=${PTK_BUILD_DIR:-build}

if [ -z "${PTK_REQUIRE+set}" ]; then
  req=()
  [ -x .venv/bin/python3 ] && req+=(venv)
  # The peers of tests/reference (trl, transformers, OpenRLHF's client), once set-up installed the pins.
  cmp -s requirements.txt .venv/ptk-requirements.txt && cmp -s requirements-nodeps.txt .venv/ptk-requirements-nodeps.txt \
    && req+=(peers)
  [ -f assets/tokenizers/qwen/tokenizer.json ] && req+=(qwen-tokenizer)
  [ -f ../shared/DESIGN.md ] && req+=(shared)
  grep -qw avx512f /proc/cpuinfo 2>/dev/null && req+=(avx512)
  [ -r /proc/net/tcp ] && req+=(procfs)
  grep -q '\[always\]\|\[madvise\]' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null && req+=(thp)
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && req+=(gpu)
  PTK_REQUIRE=$(IFS=,; echo "${req[*]:-}")
  export PTK_REQUIRE
fi
echo "test: required (a skip for want of these fails): ${PTK_REQUIRE:-nothing}"

rm -rf "$build/test-results"
mkdir -p "$build/Testing"
log="$build/Testing/ctest-output.log"
set +e
(cd "$build" && ctest -j "$(nproc)" --output-on-failure "$@") 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo
scripts/test_summary.sh "$build" "$log" || rc=1
exit $rc
