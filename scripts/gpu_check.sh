#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and torch==2.11.0 (CUDA 13) installed but no
# network and none of Debian's -dev packages:
#   1. ptk itself: the binaries scripts/gpu_prepare.sh built against the same torch wheel on a
#      Debian machine (.gpu/, carried); without .gpu/ it runs gpu_prepare.sh here (needs the -dev
#      packages);
#   2. `ptk info` (torch, CUDA compiled in and available, cuDNN, NCCL, BLAS, OpenMP, threads);
#   3. the CUDA-labelled tests (tests/cuda: HF fixture logits and gradients on the GPU, bf16), and the
#      tests whose ptk commands place models on a GPU when one is there (forward, generate), plus the
#      HF fixture tests on this machine's CPU;
# each writing its log under OUT; a summary at the end. Finishes in a few minutes on 16 cores.
#   scripts/gpu_check.sh OUT_DIR         env: PTK_TORCH_DIR (default: python3's torch)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)

TORCH_DIR=${PTK_TORCH_DIR:-$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)}
if [ -z "$TORCH_DIR" ] || [ ! -f "$TORCH_DIR/lib/libtorch_cpu.so" ]; then
  echo "gpu_check: no torch found (python3 -c 'import torch' failed); set PTK_TORCH_DIR=<site-packages>/torch" >&2
  exit 2
fi
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), $(ldd --version | head -n1), $(nproc) cores"
  echo "torch: $TORCH_DIR ($(grep -m1 '^__version__' "$TORCH_DIR/version.py"))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
} > "$OUT/machine.txt"
gpu=no
if nvidia-smi -L >/dev/null 2>&1; then gpu=yes; fi
cat "$OUT/machine.txt"

if [ -x .gpu/bin/ptk ]; then
  echo "ptk: carried build of $(cat .gpu/commit 2>/dev/null) ($(head -n1 .gpu/built.txt 2>/dev/null))"
else
  echo "ptk: no .gpu/ carried: building here against $TORCH_DIR (needs the -dev packages)"
  PTK_BUILD_DIR=build-gpu scripts/gpu_prepare.sh -DPTK_TORCH_DIR="$TORCH_DIR" -DPTK_CUDA=ON > "$OUT/build.log" 2>&1 ||
    { tail -n 30 "$OUT/build.log"; echo "gpu_check: build failed (log: $OUT/build.log)"; exit 1; }
fi
BIN=$ROOT/.gpu/bin
LIBS=$ROOT/.gpu/lib:$TORCH_DIR/lib
# Debian 12's libstdc++ only where this machine's is older than what the binaries need.
if ldd "$BIN/ptk" 2>&1 | grep -q "GLIBCXX.*not found"; then LIBS=$LIBS:$ROOT/.gpu/lib-fallback; fi
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ldd "$BIN/ptk" | grep -q "not found"; then
  ldd "$BIN/ptk" | grep "not found" | tee "$OUT/missing-libs.txt"
  echo "gpu_check: ptk cannot load the libraries above" >&2
  exit 1
fi

"$BIN/ptk" info --matmul-size 2048 > "$OUT/info.txt" 2>&1
echo "--- ptk info"; cat "$OUT/info.txt"

export PTK_SOURCE_DIR=$ROOT PTK_BINARY=$BIN/ptk OMP_WAIT_POLICY=PASSIVE
# On a machine with a working GPU a test that would skip for want of one fails instead (PTK_SKIP_WITHOUT).
[ "$gpu" = yes ] && export PTK_REQUIRE=gpu
status=0
summary=()
for t in cuda_test forward_cmd_test generate_cmd_test qwen2_test; do
  t0=$(date +%s)
  timeout 300 "$BIN/$t" --gtest_output="xml:$OUT/$t.xml" > "$OUT/$t.log" 2>&1
  rc=$?
  line=$(grep -E "^\[  (PASSED|FAILED)  \]|tests? ran" "$OUT/$t.log" | tail -n 2 | tr '\n' ' ')
  skipped=$(grep -oE "^\[  SKIPPED \] [0-9]+ tests?," "$OUT/$t.log" | grep -oE "[0-9]+" || echo 0)
  summary+=("$t: rc $rc, $(( $(date +%s) - t0 )) s, skipped $skipped; $line")
  [ $rc -eq 0 ] || status=1
done
echo "--- summary ($(( $(date +%s) - start )) s)" | tee "$OUT/summary.txt"
printf '%s\n' "${summary[@]}" | tee -a "$OUT/summary.txt"
grep -h "SKIPPED\|Failure\|error:" "$OUT"/*_test.log | head -n 40 | tee -a "$OUT/summary.txt"
exit $status
