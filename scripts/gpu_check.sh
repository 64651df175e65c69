#!/usr/bin/env bash
# The GPU check, one run on a machine with an NVIDIA GPU and torch==2.11.0 (CUDA 13) installed but no
# network and none of Debian's -dev packages (the device machines: one H100/H200, 16 cores). Parts,
# each under its own time limit, a later part running whatever an earlier one did:
#   1. ptk itself: the binaries scripts/gpu_prepare.sh built against the same torch wheel on a Debian
#      machine (.gpu/, carried); without .gpu/ it runs gpu_prepare.sh here (needs the -dev packages,
#      and most of the time budget);
#   2. `ptk info` (torch, CUDA compiled in and available, cuDNN, NCCL, BLAS, OpenMP, threads);
#   3. the CUDA-labelled tests: tests/cuda/cuda_test (HF fixture logits and gradients on the GPU, bf16)
#      and cuda_stages_test (`ptk sft` 50 steps run.device=cuda (bf16) vs cpu (fp32) within bf16
#      tolerance; DPO, RM, GRPO steps vs the CPU), the commands that place models on a GPU (forward,
#      generate), then the HF fixture tests on this machine's CPU (qwen2_test) if time is left;
#   4. the RL benchmarks (bench/gpu_rl_bench.py, parts in PTK_GPU_CHECK_RL, default "decode rollout grpo"):
#      decode: bench/decode_bench at the 0.5B and 1.5B shapes, bf16, batch 1: the engine's decode
#      tokens/s against the memory-bandwidth bound (weight bytes / the measured device-to-device copy
#      rate; goal >= 60%); rollout: 64 prompts x 8 samples x 512 new tokens at the 1.5B shape, the
#      engine beside transformers' generate re-written in plain PyTorch (bench/hf_generate_baseline.py:
#      no transformers here), same prompts, same GPU (goal >= 5x); grpo: `ptk grpo` at the 1.5B shape,
#      random init, bf16, 8 prompts x 8 samples x 256 tokens a step, beta 0.04 with the reference in
#      host memory (grpo.reference_device=host), 3 steps: seconds per step and its phase split, the
#      sampler/trainer log-prob gap per step. In bench.json as "bench-rl-<part>";
#   5. the SFT benchmark (bench/gpu_sft_bench.py): `ptk sft` at the Qwen2.5-0.5B and 3B shapes, random
#      init, bf16 with fp32 master weights, packed rows of 4096 tokens, 4 micro-batches a step, 2
#      warm-up + 5 measured steps: tokens/s, MFU against 989 TFLOP/s (H100 SXM / H200 bf16 dense) and
#      peak GPU memory, beside the same step in plain PyTorch (bench/torch_sft_baseline.py);
#      then a LoRA step at the shapes of PTK_GPU_CHECK_LORA (default "7b"): `ptk sft` with
#      model.lora.enabled=true, rank 16 on all linears, the bf16 base frozen, 1 x 4096 packed, 4
#      micro-batches a step, activation checkpointing, 1 warm-up + 3 measured steps (tokens/s, MFU
#      counting 4N + 6N_lora, peak memory); ptk only (the torch loop has no LoRA), in bench.json as
#      "bench-<shape>-lora". With the default budget it runs only if the parts before left time:
#      PTK_GPU_CHECK_SHAPES=none scripts/gpu_check.sh OUT runs the tests and then the LoRA step only.
# What comes back (the device tool returns at most 8 files): OUT/summary.txt (what ran, each figure,
# what did not run and why; written as it goes), OUT/bench.json (both shapes' results), and
# OUT/logs.tar.gz (every part's log, the tests' XML, the benchmark's metrics; refreshed after each
# part, so a run stopped at its limit still returns what it did). The whole run stays under
# PTK_GPU_CHECK_BUDGET seconds (default 540: the device tool allows 600 a command).
#   scripts/gpu_check.sh OUT_DIR      env: PTK_TORCH_DIR (default: python3's torch),
#                                     PTK_GPU_CHECK_BUDGET, PTK_GPU_CHECK_SHAPES (default "0.5b 3b"; none),
#                                     PTK_GPU_CHECK_LORA (default "7b"; "" for none),
#                                     PTK_GPU_CHECK_RL (default "decode rollout grpo"; "" for none)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
start=$(date +%s)
BUDGET=${PTK_GPU_CHECK_BUDGET:-540}
SHAPES=${PTK_GPU_CHECK_SHAPES:-"0.5b 3b"}
[ "$SHAPES" = none ] && SHAPES=
LORA_SHAPES=${PTK_GPU_CHECK_LORA-"7b"}
RL_PARTS=${PTK_GPU_CHECK_RL-"decode rollout grpo"}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# part NAME CAP_SECONDS CMD...: runs CMD with its output in LOGS/NAME.log under min(CAP, what the
# budget has left - 15 s); too little left: "not run". Sets $rc; prints one summary line.
part() {
  local name=$1 cap=$2
  shift 2
  local t
  t=$(left)
  t=$(( t - 15 < cap ? t - 15 : cap ))
  if [ "$t" -lt 20 ]; then
    say "$name: not run (the ${BUDGET} s budget is spent)"
    rc=skipped
    return
  fi
  local t0
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local how="rc $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="stopped at its ${t} s limit"
  say "$name: $how, $(( $(date +%s) - t0 )) s"
  pack
}

TORCH_DIR=${PTK_TORCH_DIR:-$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)}
if [ -z "$TORCH_DIR" ] || [ ! -f "$TORCH_DIR/lib/libtorch_cpu.so" ]; then
  say "gpu_check: no torch found (python3 -c 'import torch' failed); set PTK_TORCH_DIR=<site-packages>/torch"
  exit 2
fi
LOGS=$(mktemp -d /tmp/ptk-gpu-check.XXXXXX)  # packed into OUT/logs.tar.gz
WORK=$(mktemp -d /tmp/ptk-gpu-work.XXXXXX)   # benchmark run folders (GBs of final/): never under OUT
say "=== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "host: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), $(ldd --version | head -n1), $(nproc) cores"
say "torch: $TORCH_DIR ($(grep -m1 '^__version__' "$TORCH_DIR/version.py"))"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2 | tr '\n' ' ')"
gpu=no
if nvidia-smi -L >/dev/null 2>&1; then gpu=yes; fi

# 1. ptk
if [ -x .gpu/bin/ptk ]; then
  say "ptk: carried build of $(cat .gpu/commit 2>/dev/null) ($(head -n1 .gpu/built.txt 2>/dev/null))"
  [ "$(cat .gpu/commit 2>/dev/null)" = "$(git rev-parse HEAD 2>/dev/null)" ] ||
    say "ptk: WARNING: .gpu/ was built from another commit than this tree's HEAD ($(git rev-parse --short HEAD 2>/dev/null))"
else
  say "ptk: no .gpu/ carried: building here against $TORCH_DIR (needs the -dev packages)"
  part build 400 env PTK_BUILD_DIR=build-gpu scripts/gpu_prepare.sh -DPTK_TORCH_DIR="$TORCH_DIR" -DPTK_CUDA=ON
  if [ "$rc" != 0 ]; then say "gpu_check: build failed (logs.tar.gz: build.log)"; exit 1; fi
fi
BIN=$ROOT/.gpu/bin
LIBDIR=$ROOT/.gpu
if [ -f .gpu/libs.tar.xz ]; then  # gpu_prepare.sh packs the libraries; unpack them beside the work files
  LIBDIR=$WORK/gpu-libs
  mkdir -p "$LIBDIR"
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/libs.tar.xz "$LIBDIR" ||
    { say "gpu_check: cannot unpack .gpu/libs.tar.xz"; exit 1; }
fi
LIBS=$LIBDIR/lib:$TORCH_DIR/lib
# Debian 12's libstdc++ only where this machine's is older than what the binaries need.
if ldd "$BIN/ptk" 2>&1 | grep -q "GLIBCXX.*not found"; then LIBS=$LIBS:$LIBDIR/lib-fallback; fi
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ldd "$BIN/ptk" | grep -q "not found"; then
  ldd "$BIN/ptk" | grep "not found" | tee -a "$SUMMARY"
  say "gpu_check: ptk cannot load the libraries above"
  exit 1
fi

# 2. ptk info
part ptk-info 60 "$BIN/ptk" info --matmul-size 4096
sed 's/^/  /' "$LOGS/ptk-info.log" | head -n 30 >> "$SUMMARY"

# 3. tests
export PTK_SOURCE_DIR=$ROOT PTK_BINARY=$BIN/ptk OMP_WAIT_POLICY=PASSIVE
# On a machine with a working GPU a test that would skip for want of one fails instead (PTK_SKIP_WITHOUT).
[ "$gpu" = yes ] && export PTK_REQUIRE=gpu
status=0
test_part() {  # test_part BINARY CAP [gtest arguments]
  local t=$1 cap=$2
  shift 2
  if [ ! -x "$BIN/$t" ]; then say "$t: not run (not in .gpu/bin: rerun scripts/gpu_prepare.sh)"; status=1; return; fi
  part "$t" "$cap" "$BIN/$t" --gtest_output="xml:$LOGS/$t.xml" "$@"
  local line skipped
  line=$(grep -E "^\[  (PASSED|FAILED)  \]|tests? ran" "$LOGS/$t.log" | tail -n 2 | tr '\n' ' ')
  skipped=$(grep -oE "^\[  SKIPPED \] [0-9]+ tests?," "$LOGS/$t.log" | grep -oE "[0-9]+" || echo 0)
  say "  $t: skipped $skipped; $line"
  # Why: skip reasons counted once each, then the failures' first lines.
  grep -hA2 ": Skipped$" "$LOGS/$t.log" | grep -v -e ": Skipped$" -e "^--$" -e "^\[  SKIPPED \]" | sort | uniq -c | head -n 5 |
    sed 's/^ */    skipped: /' >> "$SUMMARY"
  grep -hE "Failure|error:|: cuda .* vs cpu|Expected|Which is" "$LOGS/$t.log" | head -n 20 | sed 's/^/    /' >> "$SUMMARY"
  [ "$rc" = 0 ] || status=1
}
test_part cuda_test 90
test_part cuda_stages_test 180
test_part forward_cmd_test 60
test_part generate_cmd_test 60
test_part loop_device_test 60 --gtest_filter='*Cuda*'
test_part zero2_test 60
# NCCL on one GPU: a process group of one rank through every collective ptk calls.
test_part comm_test 60 --gtest_filter='Comm.*OfOneRank*'

# 4. RL benchmarks (tests first, then these: the figures issue 29 asks for), then 5. SFT
bench_ok=yes
[ "$gpu" = yes ] || { say "bench: not run (no usable GPU: nvidia-smi -L failed)"; SHAPES=; LORA_SHAPES=; RL_PARTS=; bench_ok=no; }
# Results of every bench-* folder into OUT/bench.json.
collect() {
  python3 - "$WORK" "$OUT/bench.json" <<'EOF' 2>/dev/null
import glob, json, os, sys
res = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*", "result.json"))):
    res[os.path.basename(os.path.dirname(f))] = json.load(open(f))
json.dump(res, open(sys.argv[2], "w"), indent=1)
EOF
}
for rl in $RL_PARTS; do
  case "$rl" in
    decode) cap=90; extra=(--shapes "0.5b 1.5b" --decode-tokens 512) ;;
    rollout) cap=200; extra=(--shape 1.5b --prompts 64 --samples 8 --new-tokens 512) ;;
    grpo) cap=150; extra=(--shape 1.5b --prompts-per-step 8 --samples 8 --new-tokens 256 --steps 3 --reference-device host) ;;
    *) say "bench-rl-$rl: unknown part (decode, rollout, grpo)"; continue ;;
  esac
  # Each side's own limit: the rollout part runs two (the engine, then the baseline).
  side=$([ "$rl" = rollout ] && echo $(( (cap - 20) / 2 )) || echo $(( cap - 20 )))
  part "bench-rl-$rl" "$cap" python3 bench/gpu_rl_bench.py "$rl" --bin "$BIN" --out "$WORK/bench-rl-$rl" \
    --timeout "$side" "${extra[@]}"
  [ "$rc" = 0 ] || bench_ok=no
  if [ -s "$WORK/bench-rl-$rl/result.txt" ]; then
    sed 's/^/  /' "$WORK/bench-rl-$rl/result.txt" >> "$SUMMARY"
  else
    say "  bench-rl-$rl: no result ($(tail -n 3 "$LOGS/bench-rl-$rl.log" 2>/dev/null | tr '\n' ' '))"
  fi
  mkdir -p "$LOGS/bench-rl-$rl"
  (cd "$WORK/bench-rl-$rl" 2>/dev/null &&
    find . \( -name '*.log' -o -name '*.json' -o -name 'metrics.jsonl' -o -name 'result.txt' \) -size -2M \
      -not -path './run/final/*' -not -path './data/*' -not -name 'prompts.json' -exec cp --parents {} "$LOGS/bench-rl-$rl/" \;)
  collect
  pack
  rm -rf "$WORK/bench-rl-$rl/run/final" "$WORK/bench-rl-$rl/run/checkpoints"  # a 1.5B final/ is 3 GB
done
runs=""
for shape in $SHAPES; do runs="$runs $shape"; done
for shape in $LORA_SHAPES; do runs="$runs $shape-lora"; done
for shape in $runs; do
  if [ "${shape%-lora}" != "$shape" ]; then
    # LoRA r16 on all linears, ptk only: 1 warm-up + 3 steps of 4 x 4096 tokens (a 7B random init takes a while).
    cap=200
    part "bench-$shape" "$cap" python3 bench/gpu_sft_bench.py --ptk "$BIN/ptk" --shape "${shape%-lora}" --lora 16 \
      --checkpointing --seq 4096 --grad-accum 4 --steps 3 --warmup 1 --sides ptk --timeout $(( cap - 20 )) \
      --out "$WORK/bench-$shape"
  else
    cap=$([ "$shape" = 3b ] && echo 230 || echo 150)
    side_cap=$(( (cap - 20) / 2 ))
    part "bench-$shape" "$cap" python3 bench/gpu_sft_bench.py --ptk "$BIN/ptk" --shape "$shape" --seq 4096 \
      --grad-accum 4 --steps 5 --warmup 2 --timeout "$side_cap" --out "$WORK/bench-$shape"
  fi
  [ "$rc" = 0 ] || bench_ok=no
  if [ -f "$WORK/bench-$shape/result.txt" ]; then
    sed 's/^/  /' "$WORK/bench-$shape/result.txt" >> "$SUMMARY"
  else
    say "  bench-$shape: no result ($(tail -n 3 "$LOGS/bench-$shape.log" | tr '\n' ' '))"
  fi
  # The small files only (logs, recipes, metrics, results), not the data or final/.
  mkdir -p "$LOGS/bench-$shape"
  (cd "$WORK/bench-$shape" 2>/dev/null &&
    find . \( -name '*.log' -o -name '*.json' -o -name 'metrics.jsonl' -o -name 'result.txt' \) -size -2M \
      -not -path './*/run/final/*' -not -path './*/data/*' -exec cp --parents {} "$LOGS/bench-$shape/" \;)
  collect
  pack
  rm -rf "$WORK/bench-$shape/ptk/run/final" "$WORK/bench-$shape/ptk/run/checkpoints"  # disk: a 3B final/ is 6 GB
done

# 3b. the CPU fixture tests, with what time is left
test_part qwen2_test 90

say "=== summary: $(( $(date +%s) - start )) s; tests $([ $status = 0 ] && echo passed || echo 'FAILED or not all run');" \
    "benchmark $([ $bench_ok = yes ] && echo 'ran' || echo 'incomplete (see above)')"
say "not run here: the reference suite (no transformers/TRL on this machine), multi-GPU (NCCL, ptk launch)"
pack
rm -rf "$WORK" "$LOGS"
exit $status
