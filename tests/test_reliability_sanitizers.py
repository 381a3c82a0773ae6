"""The C++ core under AddressSanitizer + UndefinedBehaviorSanitizer (and ThreadSanitizer): a separate
build of cpp/triatt-{rope,score,select}.cpp with the driver tests/cpp/core_sanitize.cpp (both
scoring kernels, f16/f32 keys, 0/1/odd key counts, padded rows, partial rotary dims, non-finite
scores, every selection policy and error path) must run with zero sanitizer reports and every
check of the driver passing. tools/sanitize_core.sh does the build; the objects are kept in
build/sanitize between runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "sanitize_core.sh"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                                  reason="no C++ compiler")]


def run(*args):
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if res.returncode == 77:
        pytest.skip(res.stderr.strip().splitlines()[-1])
    return res, res.stdout + res.stderr


def test_core_has_no_address_or_undefined_behaviour_reports():
    res, out = run("--quick")
    assert res.returncode == 0, out[-6000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out
    m = re.search(r"core_sanitize: (\d+) checks, (\d+) failed", out)
    assert m and int(m.group(1)) > 10000 and m.group(2) == "0", out[-3000:]


def test_core_has_no_data_races():
    res, out = run("--quick", "--tsan")
    # (a race in triatt_pool::resize, fixed: new workers ran the finished last job again)
    assert res.returncode == 0, out[-6000:]
    assert "WARNING: ThreadSanitizer" not in out


@pytest.mark.skipif(not __import__("os").environ.get("PYTRIATT_SANITIZE_PYTHON"),
                    reason="slow (a sanitized pybind11 build, then tests/test_core_*.py about 3x slower): "
                           "set PYTRIATT_SANITIZE_PYTHON=1")
def test_python_glue_under_address_and_undefined_behaviour_sanitizers():
    """pytriatt._core (cpp/pytriatt-module.cpp: numpy <-> core conversions) built with ASan+UBSan, and
    tests/test_core_*.py run against it."""
    res, out = run("--quick", "--python")
    assert res.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", out) and "failed" not in out.split("core_sanitize:")[-1], out[-3000:]
