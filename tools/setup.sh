#!/usr/bin/env bash
# Set up a development/user environment in .venv: the patched llama-cpp-python
# (built from the pinned sdist + patches/, cached in ~/.cache/pytriatt) and pytriatt.
# Safe to re-run: rebuilds are incremental. CMAKE_ARGS passes through
# (e.g. CMAKE_ARGS="-DGGML_CUDA=ON" for NVIDIA GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip)
"${pip[@]}" install -q "scikit-build-core>=0.10" "pybind11>=2.12" "numpy>=1.24" "gguf>=0.10" "pytest>=7.4"
.venv/bin/python tools/build_llama.py
"${pip[@]}" install -q --no-build-isolation -e ".[test]"
.venv/bin/pytriatt doctor >&2 || true
