"""Specification of the backend scorer (cpp/llama-triatt-score-backend.cpp): on the CPU backend it gives the
CPU scorer's scores (to 1e-4 of the layer's largest score) for f32, f16, bf16, q8_0 and q4_0 K caches, with
and without llama.cpp's Hadamard rotation, NEOX and NORM pairing, GQA, partial rotary dims and YaRN.

The check is the C++ program tests/cpp/score_backend_test.cpp, compiled here from the sources against the
ggml headers of the patched llama.cpp tree (the build cache) and the ggml libraries installed with
llama_cpp; with PYTRIATT_SCORE_BACKEND_DEVICE=GPU it runs on a GPU backend instead (tools/device_bench.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/cpp/score_backend_test.cpp", "cpp/llama-triatt-score-backend.cpp", "cpp/triatt-score.cpp",
           "cpp/triatt-rope.cpp"]


def ggml_include() -> Path | None:
    cache = Path(os.environ.get("PYTRIATT_BUILD_CACHE", Path.home() / ".cache/pytriatt/llama-build")).expanduser()
    for d in [Path(os.environ["PYTRIATT_GGML_INCLUDE"])] if os.environ.get("PYTRIATT_GGML_INCLUDE") else \
            sorted(cache.glob("src/llama_cpp_python-*/vendor/llama.cpp/ggml/include")):
        if (d / "ggml-alloc.h").is_file():
            return d
    return None


def ggml_libdir() -> Path | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = Path(llama_cpp.__file__).parent / "lib"
    return lib if any(lib.glob("libggml-base.*")) else None


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc, lib = ggml_include(), ggml_libdir()
    if not (cxx and inc and lib):
        pytest.skip("needs a C++ compiler, the ggml headers of the patched tree (tools/build_llama.py) and "
                    "llama_cpp's ggml libraries")
    exe = tmp_path_factory.mktemp("score-backend") / "score_backend_test"
    cmd = [cxx, "-std=c++17", "-O2", "-I", str(ROOT / "cpp"), "-I", str(inc), *[str(ROOT / s) for s in SOURCES],
           f"-L{lib}", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-pthread", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


@pytest.mark.slow
def test_the_backend_scorer_matches_the_cpu_scorer_on_every_key_layout(program):
    backend = os.environ.get("PYTRIATT_SCORE_BACKEND_DEVICE", "CPU")
    r = subprocess.run([str(program), backend], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith(("ok", "FAIL"))]
    assert len(lines) == 15 and all(x.startswith("ok") for x in lines), r.stdout
    for kind in ("f32", "f16", "bf16", "q8_0", "q4_0", "rotated", "norm", "partial", "yarn"):
        assert any(kind in x for x in lines), kind
