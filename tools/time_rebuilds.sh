#!/usr/bin/env bash
# Measure the incremental rebuild times quoted in the README (run after tools/setup.sh).
# Touches files (mtime only, no content change) and times each rebuild step.
set -euo pipefail
cd "$(dirname "$0")/.."
t() { local s=$SECONDS; "$@" >/dev/null 2>&1; echo $((SECONDS - s)); }

src=$(python3 -c "import os; print(os.environ.get('PYTRIATT_BUILD_CACHE', os.path.expanduser('~/.cache/pytriatt/llama-build')))")/src/llama_cpp_python-0.3.36/vendor/llama.cpp

echo "step                                            seconds"
echo "llama build, nothing changed                    $(t .venv/bin/python tools/build_llama.py)"
touch "$src/src/llama-kv-cache.cpp"
echo "llama build, one llama.cpp source changed       $(t .venv/bin/python tools/build_llama.py)"
touch cpp/*.cpp
echo "pytriatt._core, cpp/ touched                    $(t .venv/bin/python -m pip install --no-build-isolation --no-deps -e .)"
if grep -q LLAMA_TRIATT_DIR patches/llama.cpp/*.patch 2>/dev/null; then
  touch cpp/*.cpp
  echo "llama build, cpp/ touched (core in libllama)    $(t .venv/bin/python tools/build_llama.py)"
fi
