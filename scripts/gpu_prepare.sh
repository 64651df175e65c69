#!/usr/bin/env bash
# Stages what scripts/gpu_check.sh runs on a GPU machine into .gpu/ (git-ignored): ptk, the tests
# that exercise CUDA and the HF fixtures, and bench/decode_bench (the RL benchmark; its Python
# drivers are files of the tree, carried with it), built here against the same torch==2.11.0 wheel
# the GPU machines have installed, and the non-LibTorch shared libraries they load (Boost.Program_options,
# abseil, PCRE2, utf8proc, OpenSSL's libcrypto; libstdc++ as a fallback). The GPU machines have no
# network and none of Debian's -dev packages, and building there would spend most of the check's
# minutes compiling: this is the "carry a ptk built here" route. Pass `.gpu` in the device tool's
# carry list.
#   scripts/gpu_prepare.sh [cmake args]   (after scripts/setup.sh; builds what is missing in build/;
#                                         gpu_check.sh runs it there, with the machine's torch, when
#                                         nothing was carried)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${PTK_BUILD_DIR:-build}
# The binaries gpu_check.sh runs, as paths in the build folder; the ninja target is the file name.
BINARIES=(bin/ptk tests/cuda/cuda_test tests/cuda/cuda_stages_test tests/model/qwen2_test tests/model/forward_cmd_test
          tests/rollout/generate_cmd_test tests/train/loop_device_test tests/optim/zero2_test tests/parallel/comm_test
          bench/decode_bench)
scripts/build.sh "$@" >/dev/null
ninja -C "$BUILD_DIR" "${BINARIES[@]##*/}" >/dev/null

rm -rf .gpu
mkdir -p .gpu/bin .gpu/lib .gpu/lib-fallback
for b in "${BINARIES[@]}"; do cp "$BUILD_DIR/$b" .gpu/bin/; done
strip .gpu/bin/*

# Every shared library the binaries load, except LibTorch's and NVIDIA's (the GPU machine's torch
# brings its own, the same version) and glibc's (the system's; it must be 2.34 or newer).
ldd .gpu/bin/* | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -vE '/(torch|nvidia)/|/(libc|libm|libdl|librt|libpthread|libutil|ld-linux-x86-64)\.so' |
  while read -r lib; do
    case "$(basename "$lib")" in
      libstdc++*|libgcc_s*) cp -L "$lib" .gpu/lib-fallback/ ;;  # used only where the system's is older
      *) cp -L "$lib" .gpu/lib/ ;;
    esac
  done
# The libraries travel packed (xz): Arrow and Parquet alone are 62 MB of the 64 MiB the device tool
# carries. gpu_check.sh unpacks them (Python's tarfile: no xz binary needed there).
tar -C .gpu -cf - lib lib-fallback | xz -T0 -6 > .gpu/libs.tar.xz
rm -rf .gpu/lib .gpu/lib-fallback
git rev-parse HEAD > .gpu/commit
{
  echo "built $(date -u +%FT%TZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -n1)"
  torch_dir=$(sed -n 's/^PTK_TORCH_DIR:PATH=//p' "$BUILD_DIR/CMakeCache.txt")
  echo "torch: $torch_dir ($(grep -m1 '^__version__' "$torch_dir/version.py"))"
} > .gpu/built.txt
echo "gpu_prepare: .gpu/ is $(du -sh .gpu | cut -f1) (the device tool carries at most 64 MiB); pass carry: [\".gpu\"]"
