#!/usr/bin/env bash
# The GPU benchmark of issue 7, for a lent GPU machine without network (docs/PERF.md).
#
#   tools/device_bench.sh pack        here: .device/ = the patched llama-cpp-python tree from the build cache,
#                                     pruned to what a CUDA build needs, + the wheels that machine lacks (<= 64 MiB)
#   tools/device_bench.sh configure   here: cmake-configure that tree with CUDA on (nvcc), compile nothing
#   tools/device_bench.sh run         on the GPU machine, from the repository root with .device/ carried along:
#                                     CUDA build (sm_90), a Qwen3-8B-shaped random Q8_0 model, the backend
#                                     scorer checked and timed on the GPU, then `pytriatt bench` (full vs tri at
#                                     2048 and 32768, budget 2048, all layers offloaded, --parallel auto); prints
#                                     a short table; everything also lands in $OUT (default ./device-out)
#
# With the device tool: run(command="bash tools/device_bench.sh run", carry=[".device"], timeout_s=600).
# Environment for `run`: BENCH_POSITIONS (2048,32768), BENCH_BUDGET (2048), BENCH_SHAPE (qwen3-8b),
# BENCH_PARALLEL (auto), BENCH_NBATCH (256: budget + 256 cells, 14.3x below full at 32768), SKIP_BUILD=1 (reuse an installed CUDA build), CUDA_FA=ON (FlashAttention kernels: needed
# for a quantized V cache, about doubles the build time).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cmd=${1:-}

pack() {
    local cache=${PYTRIATT_BUILD_CACHE:-$HOME/.cache/pytriatt/llama-build}
    local src=$cache/src/llama_cpp_python-0.3.36
    [ -d "$src" ] || { echo "no patched tree in $src: run tools/setup.sh (or tools/build_llama.py) first" >&2; exit 1; }
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    rm -rf .device && mkdir -p .device/wheels .device/llama_cpp_python
    # only what the CMake build of libllama + ggml (CPU, CUDA) and the Python package need; tar with
    # excludes (rsync is not on every machine)
    tar -C "$src" -cf - \
      --exclude='./llama_cpp/lib' --exclude='./examples' --exclude='./docs' --exclude='.git' \
      --exclude='./vendor/llama.cpp/docs' --exclude='./vendor/llama.cpp/models' --exclude='./vendor/llama.cpp/media' \
      --exclude='./vendor/llama.cpp/benches' --exclude='./vendor/llama.cpp/tests' --exclude='./vendor/llama.cpp/examples' \
      --exclude='./vendor/llama.cpp/tools' --exclude='./vendor/llama.cpp/.github' --exclude='./vendor/llama.cpp/gguf-py' \
      --exclude='./vendor/llama.cpp/conversion' --exclude='./vendor/llama.cpp/scripts' --exclude='./vendor/llama.cpp/pocs' \
      --exclude='./vendor/llama.cpp/app' \
      --exclude='./vendor/llama.cpp/ggml/src/ggml-vulkan' --exclude='./vendor/llama.cpp/ggml/src/ggml-sycl' \
      --exclude='./vendor/llama.cpp/ggml/src/ggml-metal' --exclude='./vendor/llama.cpp/ggml/src/ggml-cann' \
      --exclude='./vendor/llama.cpp/ggml/src/ggml-opencl' --exclude='./vendor/llama.cpp/ggml/src/ggml-musa' \
      --exclude='./vendor/llama.cpp/ggml/src/ggml-webgpu' --exclude='./vendor/llama.cpp/ggml/src/ggml-zdnn' \
      --exclude='./vendor/llama.cpp/ggml/src/ggml-hexagon' --exclude='./vendor/llama.cpp/ggml/src/ggml-openvino' \
      . | tar -C .device/llama_cpp_python -xf -
    python3 -m pip download -q --no-deps -d .device/wheels gguf==0.19.0 diskcache==5.6.3
    local kib; kib=$(du -sk .device | cut -f1)
    echo "device bundle: .device is $((kib / 1024)) MiB (limit 64 MiB with the working tree)"
    [ "$kib" -le $((60 * 1024)) ] || { echo "the bundle is too large for the device tool (64 MiB in all)" >&2; exit 1; }
}

configure() {
    [ -d .device/llama_cpp_python ] || pack
    local bdir=${CONFIGURE_DIR:-/tmp/device-bench-configure}
    rm -rf "$bdir"
    # a toolkit without cuBLAS (nvcc alone) cannot generate ggml-cuda's link step: CUBLAS_DIR points at one
    # (e.g. the nvidia-cublas wheel unpacked: CUBLAS_DIR=/path/nvidia/cu13)
    local extra=()
    if [ -n "${CUBLAS_DIR:-}" ]; then
        extra=(-DCUDA_cublas_LIBRARY="$CUBLAS_DIR/lib/libcublas.so.13" -DCUDA_cublasLt_LIBRARY="$CUBLAS_DIR/lib/libcublasLt.so.13"
               -DCMAKE_CUDA_FLAGS="-I$CUBLAS_DIR/include" -DCMAKE_CXX_FLAGS="-I$CUBLAS_DIR/include")
    fi
    # libcuda.so comes with the NVIDIA driver, not the toolkit: without it (a machine without a GPU) only the link
    # to the driver library is left out (-DGGML_CUDA_NO_VMM=ON, checked at configure time only)
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && ! ls /usr/local/cuda*/lib64/stubs/libcuda.so >/dev/null 2>&1; then
        echo "no libcuda.so here (no NVIDIA driver): configuring with -DGGML_CUDA_NO_VMM=ON"
        extra+=(-DGGML_CUDA_NO_VMM=ON)
    fi
    # the same options `run` builds with; CMake finds nvcc and checks that it compiles for sm_90
    cmake -S .device/llama_cpp_python -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAVA_BUILD=OFF -DLLAMA_TRIATT_DIR="$repo/cpp" \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA="${CUDA_FA:-OFF}" "${extra[@]}" \
        > /tmp/device-bench-configure.log 2>&1 || { grep -A8 "CMake Error" /tmp/device-bench-configure.log | head -30; exit 1; }
    grep -E "CUDA compiler identification|Using CMAKE_CUDA_ARCHITECTURES|Including CUDA backend|Generating done" \
        /tmp/device-bench-configure.log
    echo "configured with CUDA in $bdir (nothing compiled)"
}

run() {
    export PYTHONUNBUFFERED=1
    local out=${OUT:-device-out}; mkdir -p "$out"
    local positions=${BENCH_POSITIONS:-2048,32768} budget=${BENCH_BUDGET:-2048} shape=${BENCH_SHAPE:-qwen3-8b}
    local parallel=${BENCH_PARALLEL:-auto} n_batch=${BENCH_NBATCH:-256}
    local model=/tmp/device-bench-$shape.gguf
    t0=$SECONDS
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl
    # the model is written while CUDA compiles (disk vs cores)
    ( python3 -m pytriatt.testing.synth "$model" --shape "$shape" > "$out/synth.log" 2>&1; echo $? > "$out/synth.rc" ) &
    local synth_pid=$!
    if [ -z "${SKIP_BUILD:-}" ]; then
        ( cd .device/llama_cpp_python &&
          CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_TRIATT_DIR=$repo/cpp -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=${CUDA_FA:-OFF}" \
          CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-build-isolation --no-deps -C build-dir=/tmp/llama-build . ) \
          > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
        python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/pip-pytriatt.log" 2>&1 || { tail -20 "$out/pip-pytriatt.log"; exit 1; }
    fi
    echo "build: $((SECONDS - t0)) s" | tee "$out/summary.txt"

    # the backend scorer on the GPU: agreement with the CPU scorer, and one Qwen3-8B-shaped round's time
    local lib; lib=$(python3 -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
    local inc=.device/llama_cpp_python/vendor/llama.cpp/ggml/include
    g++ -std=c++17 -O2 -I cpp -I "$inc" tests/cpp/score_backend_test.cpp cpp/llama-triatt-score-backend.cpp \
        cpp/triatt-score.cpp cpp/triatt-rope.cpp -L"$lib" -lggml -lggml-base -Wl,-rpath,"$lib" -pthread \
        -o /tmp/score_backend_test
    /tmp/score_backend_test GPU 2>&1 | tee "$out/score_backend_gpu.txt" | tail -4
    /tmp/score_backend_test GPU bench 2>&1 | tee "$out/score_backend_bench.txt"

    wait "$synth_pid"; [ "$(cat "$out/synth.rc")" = 0 ] || { cat "$out/synth.log"; exit 1; }
    echo "model written: $((SECONDS - t0)) s"
    # libllama before numpy: on the H200 image importing numpy first crashed the CUDA build (docs/gpu-check.md)
    python3 -c "
import llama_cpp, sys
from pytriatt.cli import main
sys.exit(main(['bench', '$model', '--budget', '$budget', '--positions', '$positions', '-ngl', '99', '-b', '$n_batch',
               '--parallel', '$parallel', '--calib-tokens', '1024', '--json']))" > "$out/bench.json" 2> "$out/bench.log" ||
        { tail -20 "$out/bench.log"; exit 1; }
    python3 -c "
import llama_cpp, json
from pytriatt import benchmark
print(benchmark.format_report(json.load(open('$out/bench.json'))))" | tee "$out/bench.txt"
    echo "total: $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}

case "$cmd" in
    pack) pack ;;
    configure) configure ;;
    run) run ;;
    *) echo "usage: tools/device_bench.sh pack | configure | run" >&2; exit 2 ;;
esac
