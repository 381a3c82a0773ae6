#!/usr/bin/env bash
# Prepare .device/ for a check on a GPU machine without network (docs/gpu-check.md, docs/PERF.md):
# the patched llama-cpp-python tree from the build cache, pruned to what a CUDA build needs, and the wheels
# of the pure-Python packages that machine lacks. Kept for docs/gpu-check.md; the same as
# `tools/device_bench.sh pack`, which also runs the benchmark (`tools/device_bench.sh run`).
set -euo pipefail
exec "$(dirname "$0")/device_bench.sh" pack
