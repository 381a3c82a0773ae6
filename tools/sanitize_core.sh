#!/usr/bin/env bash
# Build the TriAttention C++ core (cpp/triatt-{rope,score,select}.cpp) with the test driver
# tests/cpp/core_sanitize.cpp under AddressSanitizer + UndefinedBehaviorSanitizer (and, with
# --tsan, a second build under ThreadSanitizer) and run it. Any sanitizer report aborts the run
# (-fno-sanitize-recover=all, halt_on_error): exit status 0 means zero reports and every check
# of the driver passed.
#
#   tools/sanitize_core.sh            # ASan+UBSan, full driver
#   tools/sanitize_core.sh --quick    # fewer cases (what the pytest test runs)
#   tools/sanitize_core.sh --tsan     # also ThreadSanitizer: two scorers on two threads, 3-thread pools
#   tools/sanitize_core.sh --python   # also pytriatt._core (the pybind11 glue) under ASan+UBSan, running
#                                     # tests/test_core_*.py with libasan preloaded (PYTHON: the interpreter)
#
# Environment: CXX (default g++), SANITIZE_BUILD_DIR (default build/sanitize), JOBS (default 2),
# TSAN_REPEAT (default 5: races show only in some interleavings).
# Exit status 77 means the compiler cannot link a sanitizer runtime (the test skips then).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cxx="${CXX:-g++}"
out="${SANITIZE_BUILD_DIR:-$here/build/sanitize}"
quick=""
tsan=0
python_glue=0
for a in "$@"; do
    case "$a" in
        --quick) quick="--quick" ;;
        --tsan) tsan=1 ;;
        --python) python_glue=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "sanitize_core.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"

srcs=("$here/cpp/triatt-rope.cpp" "$here/cpp/triatt-score.cpp" "$here/cpp/triatt-select.cpp"
      "$here/tests/cpp/core_sanitize.cpp")
common=(-std=c++17 -O1 -g -fno-omit-frame-pointer -I"$here/cpp" -pthread)

# can this compiler link the runtime at all?
probe() {
    echo 'int main() { return 0; }' > "$out/probe.cpp"
    "$cxx" "$@" "$out/probe.cpp" -o "$out/probe" >/dev/null 2>&1
}

# compile each source to an object in parallel (JOBS), then link; rebuild only what changed
build() {
    local name="$1"; shift
    local objs=() pids=()
    for s in "${srcs[@]}"; do
        local o="$out/$name-$(basename "$s" .cpp).o"
        objs+=("$o")
        if [[ ! -f "$o" || "$s" -nt "$o" || "$here/cpp/triatt-core.h" -nt "$o" || "$0" -nt "$o" ]]; then
            "$cxx" "${common[@]}" "$@" -c "$s" -o "$o" &
            pids+=($!)
            if (( ${#pids[@]} >= ${JOBS:-2} )); then
                wait "${pids[0]}"; pids=("${pids[@]:1}")
            fi
        fi
    done
    for p in "${pids[@]}"; do wait "$p"; done
    "$cxx" "${common[@]}" "$@" "${objs[@]}" -o "$out/$name"
}

asan_flags=(-fsanitize=address,undefined -fno-sanitize-recover=all)
if ! probe "${asan_flags[@]}"; then
    echo "sanitize_core.sh: $cxx cannot link -fsanitize=address,undefined (libasan/libubsan missing)" >&2
    exit 77
fi
echo "building core_asan ($cxx ${asan_flags[*]})" >&2
build core_asan "${asan_flags[@]}"
echo "running core_asan $quick" >&2
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$out/core_asan" $quick

if (( tsan )); then
    tsan_flags=(-fsanitize=thread)
    if ! probe "${tsan_flags[@]}"; then
        echo "sanitize_core.sh: $cxx cannot link -fsanitize=thread (libtsan missing)" >&2
        exit 77
    fi
    echo "building core_tsan ($cxx ${tsan_flags[*]})" >&2
    build core_tsan "${tsan_flags[@]}"
    # a race shows only when the threads interleave badly: run it TSAN_REPEAT times (default 5)
    for ((i = 1; i <= ${TSAN_REPEAT:-5}; i++)); do
        echo "running core_tsan --quick --threads ($i/${TSAN_REPEAT:-5})" >&2
        TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" "$out/core_tsan" --quick --threads
    done
fi
if (( python_glue )); then
    py="${PYTHON:-$here/.venv/bin/python}"
    ext="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    mod="$out/pymod/_core$ext"
    mkdir -p "$out/pymod"
    if [[ ! -f "$mod" || "$0" -nt "$mod" || -n "$(find "$here/cpp" -name 'triatt-*' -newer "$mod" -o -name 'pytriatt-module.cpp' -newer "$mod")" ]]; then
        echo "building pytriatt._core with ${asan_flags[*]}" >&2
        # shellcheck disable=SC2046
        "$cxx" "${common[@]}" "${asan_flags[@]}" -shared -fPIC -fvisibility=hidden -DPYTRIATT_VERSION='"asan"' \
            $("$py" -m pybind11 --includes) "$here/cpp/pytriatt-module.cpp" "$here/cpp/triatt-rope.cpp" \
            "$here/cpp/triatt-score.cpp" "$here/cpp/triatt-select.cpp" -o "$mod"
    fi
    echo "running tests/test_core_*.py on the sanitized pytriatt._core" >&2
    # Python itself is not built with ASan: preload the runtime (and libstdc++, whose __cxa_throw the
    # runtime must find at start-up to intercept C++ exceptions), and leave leak checking off (the
    # interpreter keeps its objects until exit)
    LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    PYTRIATT_SANITIZED_CORE="$mod" "$py" - "$here" <<'PYEOF'
import importlib.util, os, sys
here = sys.argv[1]
# load the sanitized build as pytriatt._core before pytriatt imports its own
spec = importlib.util.spec_from_file_location("pytriatt._core", os.environ["PYTRIATT_SANITIZED_CORE"])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["pytriatt._core"] = mod
import pytriatt.core
assert pytriatt.core._core is mod, "the sanitized _core was not picked up"
import glob, pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sorted(glob.glob(os.path.join(here, "tests", "test_core_*.py")))]))
PYEOF
fi
echo "sanitize_core.sh: no sanitizer reports" >&2
