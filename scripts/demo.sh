#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs ptk's main job — the tiny
# end-to-end demo (recipes/tiny/pipeline.json): generate the arithmetic task (byte-level tokenizer),
# SFT a small random-init Qwen2 on it, DPO on preference pairs, train a reward model, then GRPO
# against a local reward server (verifiers + that reward model); held-out accuracy after each stage.
# Extra arguments go to `ptk pipeline` (e.g. --dry-run). Rerunning skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
PTK=${PTK_BUILD_DIR:-build}/bin/ptk
"$PTK" info --matmul-size 512
echo
start=$(date +%s)
"$PTK" pipeline --recipe recipes/tiny/pipeline.json "$@"
echo
echo "pipeline: $(( $(date +%s) - start )) s. Run folders: runs/pipeline/<stage> (metrics.jsonl, report.md with curves, final/)."
