#!/usr/bin/env bash
# Installs everything ptk needs on Debian 12, idempotently:
#  1. Debian's packages: the compiler and build tools, the -dev packages ptk links (Boost, abseil,
#     RapidJSON, GoogleTest, PCRE2, utf8proc, cpp-httplib, OpenSSL, zlib), Gloo's headers for c10d, ccache,
#     Python's venv module;
#  2. a project-local virtual environment, .venv/, with the pinned packages of requirements.txt:
#     torch==2.11.0 (CUDA 13), whose libtorch is the one LibTorch ptk builds against and links, and the
#     Python references tests and benchmarks compare against (tokenizers, transformers, trl, OpenRLHF's
#     client from requirements-nodeps.txt, installed without its dependencies);
#  3. the Qwen tokenizer files where recipes find them by default (assets/tokenizers/qwen/), copied
#     from ../shared/tokenizers/qwen when that folder is there.
# No CUDA toolkit is needed: ptk has no .cu files, and the CUDA headers its GPU code paths compile
# against come with the torch wheel's NVIDIA dependencies. Not a build script (scripts/build.sh).
# Environment: PTK_PYTHON (the interpreter that makes .venv; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git clang
  python3 python3-venv
  libgloo-dev rapidjson-dev libboost-program-options-dev libabsl-dev libgtest-dev
  libpcre2-dev libutf8proc-dev libcpp-httplib-dev libssl-dev zlib1g-dev
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

# The virtual environment. requirements.txt is copied into it once installed: a changed pin reinstalls.
PY=${PTK_PYTHON:-python3}
if [ ! -x .venv/bin/python3 ]; then
  echo "setup: creating .venv with $($PY --version 2>&1) ($(command -v "$PY"))"
  "$PY" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/ptk-requirements.txt || ! cmp -s requirements-nodeps.txt .venv/ptk-requirements-nodeps.txt; then
  echo "setup: pip install -r requirements.txt into .venv (torch 2.11.0 with CUDA 13 is ~3 GB with its NVIDIA libraries)"
  .venv/bin/python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python3 -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  cp requirements.txt .venv/ptk-requirements.txt
  cp requirements-nodeps.txt .venv/ptk-requirements-nodeps.txt
else
  echo "setup: .venv matches requirements.txt"
fi

# Default tokenizer files for recipes and the tests that use the real Qwen vocabulary.
shared_tok=../shared/tokenizers/qwen
if [ -f "$shared_tok/tokenizer.json" ]; then
  mkdir -p assets/tokenizers/qwen
  for f in tokenizer.json tokenizer_config.json; do
    cmp -s "$shared_tok/$f" "assets/tokenizers/qwen/$f" 2>/dev/null || cp "$shared_tok/$f" "assets/tokenizers/qwen/$f"
  done
elif [ ! -f assets/tokenizers/qwen/tokenizer.json ]; then
  echo "setup: no Qwen tokenizer files ($shared_tok is absent): tests that need them will skip;" \
       "put tokenizer.json and tokenizer_config.json of a Qwen2.5 checkpoint into assets/tokenizers/qwen/"
fi
echo "setup: done in $(( $(date +%s) - start )) s"
