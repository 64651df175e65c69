#!/usr/bin/env bash
# The README's main command: installs what is missing, builds, and runs ptk's main job on the tiny
# task: generate the arithmetic data (byte-level tokenizer), SFT a small random-init Qwen2 on it,
# and report held-out accuracy before and after. It grows into the full SFT -> DPO -> RM -> GRPO
# pipeline as those stages land (README status table).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
PTK=${PTK_BUILD_DIR:-build}/bin/ptk
"$PTK" info --matmul-size 512
echo
echo "== 1/3 task data: two-digit addition, 9,700 train / 300 held-out problems"
"$PTK" make-data arithmetic --out data/arith --tokenizer bytes
echo
echo "== 2/3 SFT: recipes/tiny/sft.json (random-init 2-layer Qwen2, 259-token vocabulary)"
"$PTK" sft --recipe recipes/tiny/sft.json "$@"
echo
echo "== 3/3 held-out accuracy of runs/sft/final (greedy, math verifier)"
"$PTK" eval --model runs/sft/final --data data/arith/rl_eval.jsonl --verifier math --max-new-tokens 24
echo
echo "Run folder: runs/sft (metrics.jsonl, checkpoints/, final/). Curves: $PTK plot runs/sft --metric loss,eval/loss --out runs/sft/loss.svg"
