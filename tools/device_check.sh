#!/usr/bin/env bash
# The GPU check, run on a CUDA machine without network from the repository root, after
# tools/device_bundle.sh prepared .device/ here (see docs/gpu-check.md). It builds the patched
# llama-cpp-python for CUDA (sm_90, FlashAttention kernels off to keep the build short), runs the
# memory-primitive and calibration tests with every layer offloaded to the GPU, and measures the
# scorer's thread scaling on that machine's CPU cores. Results go to $OUT (or ./device-out).
set -euo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-device-out}; mkdir -p "$out"
repo=$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# the machine's own python3 (its environment has scikit-build-core, pybind11, numpy, pytest)
pip() { python3 -m pip "$@"; }
python() { python3 "$@"; }
pip install -q --no-index --no-deps .device/wheels/*.whl

t0=$SECONDS
( cd .device/llama_cpp_python &&
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_TRIATT_DIR=$repo/cpp -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -q --no-build-isolation --no-deps -C build-dir=/tmp/llama-build . ) \
  > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "CUDA build of the patched llama-cpp-python: $((SECONDS - t0)) s" | tee "$out/summary.txt"
pip install -q --no-build-isolation --no-deps -e . > /dev/null
python -m pytriatt doctor | tee -a "$out/summary.txt" || true

# every layer on the GPU: K/V caches and the queries the capture reads live in device memory.
# libllama is loaded before numpy: on the H200 image, importing numpy first made the CUDA build
# crash inside llama_model_load_from_file (docs/gpu-check.md)
PYTRIATT_N_GPU_LAYERS=99 python -c "
import llama_cpp, sys, pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not real',
                      'tests/test_memory_positions.py', 'tests/test_calibrate.py']))" 2>&1 | tail -15 | tee -a "$out/summary.txt"

python tools/bench_core.py --threads 1 2 4 8 16 --key-types f32 f16 --repeat 5 2>&1 | tee "$out/bench_core.txt"
