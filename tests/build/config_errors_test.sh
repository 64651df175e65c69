#!/usr/bin/env bash
# The configure step's one-line errors for a LibTorch that cannot work (cmake/PtkTorch.cmake): no
# venv, another torch version, an old-ABI libtorch, a CPU-only wheel with -DPTK_CUDA=ON, missing CUDA
# headers; and a CPU-only wheel configures as a CPU-only build. Fake torch folders borrow the real
# wheel's files where a check needs them. Runs cmake's configure only (a few seconds each).
#   config_errors_test.sh SOURCE_DIR REAL_TORCH_DIR
set -uo pipefail
SRC=$1 TORCH=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
passes=0

# expect NAME PATTERN cmake-args... : configure fails and its error names PATTERN.
expect() {
  local name=$1 pattern=$2; shift 2
  local out rc
  out=$(cmake -S "$SRC" -B "$tmp/b-$name" -G Ninja -DPTK_BUILD_TESTS=OFF -DPTK_BUILD_BENCH=OFF "$@" 2>&1)
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "FAIL $name: configure succeeded"; fails=$((fails + 1))
  elif ! grep -q -- "$pattern" <<<"$(tr -s ' \n' ' ' <<<"$out")"; then
    echo "FAIL $name: error does not say '$pattern':"; echo "$out" | grep -A4 "CMake Error"; fails=$((fails + 1))
  else
    echo "ok   $name: $(tr -s ' \n' ' ' <<<"$out" | grep -o "ptk: .*" | cut -c1-110)"; passes=$((passes + 1))
  fi
}

# A torch folder: version.py with VERSION and CUDA, include/ from the real wheel, lib/ as given.
fake() {  # dir version cuda lib-source
  mkdir -p "$1"
  ln -s "$TORCH/include" "$1/include"
  ln -s "$4" "$1/lib"
  printf "__version__ = '%s'\ncuda: Optional[str] = %s\n" "$2" "$3" > "$1/version.py"
}

# No venv: a source tree without .venv/ (a copy of the CMake files is enough to reach the check).
mkdir -p "$tmp/novenv"
cp -r "$SRC/CMakeLists.txt" "$SRC/cmake" "$tmp/novenv/"
out=$(cmake -S "$tmp/novenv" -B "$tmp/b-novenv" -G Ninja 2>&1)
if grep -q "Run scripts/setup.sh" <<<"$(tr -s ' \n' ' ' <<<"$out")" && grep -q "no LibTorch" <<<"$out"; then
  echo "ok   novenv"; passes=$((passes + 1))
else
  echo "FAIL novenv:"; echo "$out" | tail -n 8; fails=$((fails + 1))
fi

fake "$tmp/old" 2.10.0+cu128 "'12.8'" "$TORCH/lib"
expect version "ptk is built against torch==2.11.0. Run scripts/setup.sh" -DPTK_TORCH_DIR="$tmp/old"

mkdir -p "$tmp/oldabi-lib"
for f in libtorch.so libtorch_cpu.so libgomp.so.1; do ln -s "$TORCH/lib/$f" "$tmp/oldabi-lib/$f"; done
printf 'no new-ABI names in here\n' > "$tmp/oldabi-lib/libc10.so"
fake "$tmp/oldabi" 2.11.0+cu130 "'13.0'" "$tmp/oldabi-lib"
expect abi "old C++ ABI" -DPTK_TORCH_DIR="$tmp/oldabi"

fake "$tmp/cpu" 2.11.0+cpu None "$TORCH/lib"
expect cuda-on-cpu-wheel "has no CUDA. Run scripts/setup.sh" -DPTK_TORCH_DIR="$tmp/cpu" -DPTK_CUDA=ON
out=$(cmake -S "$SRC" -B "$tmp/b-cpu" -G Ninja -DPTK_BUILD_TESTS=OFF -DPTK_BUILD_BENCH=OFF -DPTK_TORCH_DIR="$tmp/cpu" 2>&1)
if grep -q "CUDA=OFF" <<<"$out"; then echo "ok   cpu-wheel: a CPU-only build"; passes=$((passes + 1)); else echo "FAIL cpu-wheel:"; echo "$out" | tail -n 8; fails=$((fails + 1)); fi

# A CUDA wheel whose site-packages lacks the NVIDIA headers: the check falls back to a CUDA toolkit
# (CUDA_HOME, /usr/local/cuda), so it can only be seen failing where there is none.
if [ -e "${CUDA_HOME:-/nonexistent}/include/cuda_runtime_api.h" ] || [ -e /usr/local/cuda/include/cuda_runtime_api.h ]; then
  echo "skip cuda-headers: this machine has a CUDA toolkit, which the check rightly falls back to"
else
  mkdir -p "$tmp/site"
  fake "$tmp/site/torch" 2.11.0+cu130 "'13.0'" "$TORCH/lib"
  expect cuda-headers "PTK_CUDA needs the CUDA 13.0 runtime headers" -DPTK_TORCH_DIR="$tmp/site/torch"
fi

echo "config_errors_test: $passes passed, $fails failed"
exit $((fails > 0))
