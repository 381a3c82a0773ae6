#!/usr/bin/env bash
# Prepare .device/ for a check on a GPU machine without network (see docs/gpu-check.md):
# the patched llama-cpp-python tree from the build cache, pruned to what a CUDA build needs
# (<64 MiB), and the wheels of the pure-Python packages that machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${PYTRIATT_BUILD_CACHE:-$HOME/.cache/pytriatt/llama-build}
src=$cache/src/llama_cpp_python-0.3.36
[ -d "$src" ] || { echo "run tools/setup.sh first (no patched tree in $src)" >&2; exit 1; }
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/wheels
# tar with excludes (rsync is not on every machine)
tar -C "$src" -cf - \
  --exclude='./llama_cpp/lib' --exclude='./examples' --exclude='./docs' --exclude='.git' \
  --exclude='./vendor/llama.cpp/docs' --exclude='./vendor/llama.cpp/models' --exclude='./vendor/llama.cpp/media' \
  --exclude='./vendor/llama.cpp/benches' --exclude='./vendor/llama.cpp/tests' --exclude='./vendor/llama.cpp/examples' \
  --exclude='./vendor/llama.cpp/tools' --exclude='./vendor/llama.cpp/.github' --exclude='./vendor/llama.cpp/gguf-py' \
  --exclude='./vendor/llama.cpp/conversion' --exclude='./vendor/llama.cpp/scripts' --exclude='./vendor/llama.cpp/pocs' \
  --exclude='./vendor/llama.cpp/app' . | (mkdir -p .device/llama_cpp_python && tar -C .device/llama_cpp_python -xf -)
python3 -m pip download -q --no-deps -d .device/wheels gguf==0.19.0 diskcache==5.6.3
du -sh .device
